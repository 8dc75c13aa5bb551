"""Tiny real models and tokenizers for tests, built offline from configs.

The tokenizers are real byte-level BPE tokenizers trained here on a small corpus, so they
save, load and decode like hub tokenizers. Weights are random (seeded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
)

IMAGE_SIZE = 30
CORPUS = [
    "a photo of a red circle on a white background",
    "a blue square and a green triangle",
    "what colour is the shape? red. what shape is it? a circle.",
    "question: is there a cat? short answer: yes",
    "the quick brown fox jumps over the lazy dog",
    "an astronaut, a rocket, a cup of coffee and a cat on a sofa",
    "user: describe the image. assistant: a small yellow rectangle.",
] * 20
# Words the tiny BERT knows beyond the corpus (stage-1 captions tell pictures apart by them).
EXTRA_WORDS = ["left", "right", "orange", "purple"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(style: str = "llama", chat: bool = False) -> PreTrainedTokenizerFast:
    """A real BPE tokenizer: `opt` adds `</s>` as BOS (like OPT's), `llama` adds `<s>`."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False))
    bos = "</s>" if style == "opt" else "<s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_bert(tmp: Path) -> Path:
    """A tiny BERT checkpoint (weights + WordPiece tokenizer) to initialise a Q-Former from."""
    words = sorted({w for line in CORPUS for w in line.replace("?", " ").replace(".", " ").split()} | set(EXTRA_WORDS))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (tmp / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(tmp)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    BertModel(cfg).save_pretrained(tmp)
    return tmp


def image_processor(size: int = IMAGE_SIZE) -> BlipImageProcessor:
    return BlipImageProcessor(size={"height": size, "width": size})


def vision_config(width: int = 32) -> dict:
    return dict(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=10,
    )


def qformer_config(width: int = 32) -> dict:
    return dict(
        hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * width,
        cross_attention_frequency=1, vocab_size=200, max_position_embeddings=64,
    )


def text_config(kind: str, vocab_size: int, width: int = 32) -> dict:
    common = dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "opt":
        cfg = OPTConfig(ffn_dim=2 * width, word_embed_proj_dim=width, max_position_embeddings=128, **common)
        cfg.bos_token_id = 2  # OPT's BOS is </s>
    else:
        cfg = LlamaConfig(intermediate_size=2 * width, num_key_value_heads=2, max_position_embeddings=128, **common)
    return cfg.to_dict()


def save_official_blip2(
    path: Path,
    llm: str = "opt",
    num_query_tokens: int = 4,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    vision: dict | None = None,
    qformer: dict | None = None,
    text: dict | None = None,
    chat: bool = False,
) -> Path:
    """A random-weight `Blip2ForConditionalGeneration` checkpoint in the official layout.

    `vision` / `qformer` / `text` override entries of the tiny sub-configs (benchmarks use them
    for mid-size shapes); `image_size` sets both the vision tower's and the processor's size.
    """
    tokenizer = make_tokenizer("opt" if llm == "opt" else "llama", chat=chat)
    processor = Blip2Processor(image_processor(image_size), tokenizer, num_query_tokens=num_query_tokens)
    config = Blip2Config(
        vision_config=vision_config() | {"image_size": image_size} | (vision or {}),
        qformer_config=qformer_config() | (qformer or {}),
        text_config=text_config(llm, len(tokenizer)) | (text or {}),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return _save_random(Blip2ForConditionalGeneration, config, processor, path, seed)


def save_official_retrieval(path: Path, num_query_tokens: int = 4, seed: int = 0, width: int = 32,
                            image_text_hidden_size: int = 16, layers: int = 2) -> Path:
    """A random-weight `Blip2ForImageTextRetrieval` checkpoint (BERT tokenizer), as transformers saves it."""
    from transformers import Blip2ForImageTextRetrieval

    bert_dir = path / "_bert"
    bert_dir.mkdir(parents=True, exist_ok=True)
    make_bert(bert_dir)
    tokenizer = BertTokenizerFast.from_pretrained(bert_dir)
    processor = Blip2Processor(image_processor(), tokenizer, num_query_tokens=num_query_tokens)
    qcfg = qformer_config(width) | {"vocab_size": len(tokenizer), "use_qformer_text_input": True,
                                    "num_hidden_layers": layers, "cross_attention_frequency": 2}
    config = Blip2Config(
        vision_config=vision_config(),
        qformer_config=qcfg,
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=image_text_hidden_size,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    config.architectures = ["Blip2ForImageTextRetrieval"]
    return _save_random(Blip2ForImageTextRetrieval, config, processor, path, seed)


def save_official_instructblip(path: Path, num_query_tokens: int = 4, seed: int = 0) -> Path:
    """A random-weight `InstructBlipForConditionalGeneration` checkpoint (Llama LLM)."""
    tokenizer = make_tokenizer("llama")
    bert_dir = path / "_bert"
    bert_dir.mkdir(parents=True, exist_ok=True)
    make_bert(bert_dir)
    qformer_tokenizer = BertTokenizerFast.from_pretrained(bert_dir)
    processor = InstructBlipProcessor(image_processor(), tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens)
    qcfg = qformer_config()
    qcfg["vocab_size"] = len(qformer_tokenizer)
    config = InstructBlipConfig(
        vision_config=vision_config(),
        qformer_config=qcfg,
        text_config=text_config("llama", len(tokenizer)),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return _save_random(InstructBlipForConditionalGeneration, config, processor, path, seed)


def _save_random(model_class, config, processor, path: Path, seed: int) -> Path:
    """Build `model_class(config)` with seeded random weights; save it and `processor` to `path`."""
    torch.manual_seed(seed)
    model = model_class(config)
    _randomize(model)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _randomize(model: torch.nn.Module) -> None:
    """Give every weight a visible random value (official inits zero the queries, etc.)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.3 if p.dim() > 1 else 0.05)


def random_image(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def save_tiny_vlm(
    path: Path, llm: str = "llama", chat: bool = True, num_query_tokens: int = 4, width: int = 32, seed: int = 0,
    vision: dict | None = None,
) -> Path:
    """A random-weight `vlm` checkpoint (BLIP-2 vision tower, Q-Former, tiny LLM) + processor.

    `vision` overrides entries of the tiny vision config (a wider, deeper tower for memory tests)."""
    from vlm import VisionLanguageModel, VLMConfig, VLMProcessor

    tokenizer = make_tokenizer("opt" if llm == "opt" else "llama", chat=chat)
    processor = VLMProcessor(image_processor(), tokenizer, num_query_tokens=num_query_tokens)
    config = VLMConfig(
        vision_config={"model_type": "blip_2_vision_model", **vision_config(), **(vision or {})},
        qformer_config={"model_type": "blip_2_qformer", **qformer_config()},
        text_config=text_config(llm, len(tokenizer), width=width),
        num_query_tokens=num_query_tokens,
        image_token_index=processor.image_token_id,
    )
    return _save_random(VisionLanguageModel, config, processor, path, seed)


def save_vision_part(path: Path, kind: str, width: int = 32) -> Path:
    """A tiny pretrained-style vision encoder folder (weights + image processor config)."""
    from transformers import (
        BitImageProcessor, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
        SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel,
    )

    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=10)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    torch.manual_seed(1)
    if kind == "clip":
        model, proc = CLIPVisionModel(CLIPVisionConfig(**common)), CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size=size)
    elif kind == "siglip":
        model, proc = SiglipVisionModel(SiglipVisionConfig(**common)), SiglipImageProcessor(size=size)
    elif kind == "dinov2":
        model = Dinov2Model(Dinov2Config(**common))
        proc = BitImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=size, do_center_crop=True)
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def save_llm_part(path: Path, kind: str, width: int = 32, chat: bool = False) -> Path:
    """A tiny causal LM folder (weights + real BPE tokenizer): llama, qwen2 or opt."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = make_tokenizer("opt" if kind == "opt" else "llama", chat=chat)
    vocab = len(tokenizer)
    if kind == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        from transformers import AutoConfig
        cfg = AutoConfig.for_model(**text_config(kind, vocab, width))
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
