"""File names inside checkpoint and training-output folders, shared by loading, training and the
demo build. Kept free of heavy imports so that any module can use them."""

# The trained bridge (Q-Former, query tokens, projection) beside a LoRA adapter: peft's adapter
# file holds only the LoRA weights.
BRIDGE_WEIGHTS = "bridge.safetensors"
# peft's adapter folder (its CONFIG_NAME and SAFETENSORS_WEIGHTS_NAME, without importing peft).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Statistics of a model's training images, for warnings on images unlike them (`vlm.novelty`).
NOVELTY_FILE = "novelty.safetensors"
