"""Release tooling for the offline demo (not needed to use it): writing the text-rehearsal rows
(`rehearsal`) and shipping a training run's weights into `vlm/demo_weights/` (`ship`)."""
