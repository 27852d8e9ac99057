"""The two training engines. Both return (model, tokenizer) ready for the same TRL SFTTrainer.

- hf: transformers + PEFT. Works everywhere (CPU, MPS, CUDA), also under torchrun / accelerate launch.
- unsloth: Unsloth's patched model and kernels on NVIDIA GPUs. Imported lazily, and before
  transformers/trl/peft in the process (``import_unsloth_first``), or it loses its patches.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

from opensem.kernel.config import TrainConfig
from opensem.errors import OpenSEMError

LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def unsloth_available() -> tuple[bool, str]:
    """Can Unsloth run here? (without importing it unless a GPU is present)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no NVIDIA GPU"
    if importlib.util.find_spec("unsloth") is None:
        return False, "unsloth is not installed (pip install 'opensem[gpu]')"
    return True, "NVIDIA GPU and unsloth installed"


def choose_engine(cfg: TrainConfig, console) -> str:
    ok, why = unsloth_available()
    if cfg.engine == "hf":
        return "hf"
    if cfg.engine == "unsloth":
        if not ok:
            raise OpenSEMError(f"configs/train_config.yaml: key 'engine': unsloth cannot run here ({why}); use engine: hf or auto")
        return "unsloth"
    if ok:
        return "unsloth"
    console.print(f"engine auto: using the hf engine (transformers + PEFT + TRL) because Unsloth cannot run here: {why}",
                  soft_wrap=True)
    return "hf"


def import_unsloth_first() -> None:
    late = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
    if late:
        print(f"note: {', '.join(late)} were imported before unsloth; its patches may be partial", file=sys.stderr)
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # NotImplementedError without an accelerator, ImportError on a broken install
        raise OpenSEMError(f"unsloth failed to import ({type(e).__name__}: {str(e)[:120]}); use engine: hf") from None


def target_modules(cfg: TrainConfig):
    return LINEAR_NAMES if cfg.lora_target_modules == "all-linear" else list(cfg.lora_target_modules)


def embedding_lr(cfg: TrainConfig) -> Optional[float]:
    """The learning rate of the fully trained modules (lora_modules_to_save), or None when there are none."""
    if not cfg.lora_modules_to_save and not cfg.lora_model_dir:
        return None
    return cfg.embedding_learning_rate or cfg.learning_rate / 10


def lora_config(cfg: TrainConfig, tie_word_embeddings: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules if cfg.lora_target_modules == "all-linear" else list(cfg.lora_target_modules),
        modules_to_save=list(cfg.lora_modules_to_save) or None, use_rslora=cfg.peft_use_rslora,
        # a model whose lm_head is its embedding matrix keeps one trained copy of it, not two that drift apart
        ensure_weight_tying=bool(cfg.lora_modules_to_save) and tie_word_embeddings,
        task_type="CAUSAL_LM",
    )


def load_hf(model_path: str, cfg: TrainConfig, precision: str, device: str, wrap: bool = True):
    """The model and tokenizer; with ``wrap`` the LoRA of ``cfg`` applied (else the trainer applies ``lora_config``)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kwargs: dict = {}
    if device == "cuda":
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
        if cfg.adapter == "qlora":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"],
            )
    else:
        # CPU: the frozen base weights in bf16 when the profile trains in bf16 (half the memory, and autocast
        # keeps no second copy); the LoRA weights stay fp32 (PEFT upcasts adapters) for stable updates.
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, use_safetensors=True, trust_remote_code=False, **kwargs)
    if cfg.adapter == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    if cfg.lora_model_dir:  # go on training an adapter (e.g. the continued pre-training one): its own LoRA settings
        from peft import PeftModel

        return PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=True), tok
    if not wrap:
        return model, tok
    return get_peft_model(model, lora_config(cfg, bool(getattr(model.config, "tie_word_embeddings", False)))), tok


def load_unsloth(model_path: str, cfg: TrainConfig, precision: str, gradient_checkpointing: bool):
    from unsloth import FastLanguageModel  # imported first by the recipe

    import torch

    # an adapter folder loads as base + adapter, ready to train on (Unsloth reads its base from adapter_config.json)
    model, tok = FastLanguageModel.from_pretrained(
        model_name=cfg.lora_model_dir or model_path,
        max_seq_length=cfg.sequence_len,
        dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
        load_in_4bit=cfg.adapter == "qlora",
        local_files_only=os.path.isdir(cfg.lora_model_dir or model_path),
    )
    if not cfg.lora_model_dir:
        # Unsloth's continued pre-training recipe: embed_tokens / lm_head named among the targets are trained in full
        model = FastLanguageModel.get_peft_model(
            model,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=target_modules(cfg) + list(cfg.lora_modules_to_save),
            use_rslora=cfg.peft_use_rslora,
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=cfg.seed,
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def apply_checkpointing(model, share: float) -> int:
    """Recompute the activations of ``share`` of the decoder layers (evenly spread); returns how many."""
    if share <= 0:
        return 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers 5's name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in base.modules() if hasattr(m, "_gradient_checkpointing_func") or type(m).__name__.endswith("DecoderLayer")]
    layers = [m for m in layers if hasattr(m, "gradient_checkpointing")]
    every = max(1, round(1 / share))
    on = 0
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
        on += layer.gradient_checkpointing
    return on


def make_trainer_class(engine: str = "hf", embedding_learning_rate: Optional[float] = None):
    """SFTTrainer whose loss looks only at answer positions, and which counts real (non-pad) tokens.

    The logits (and the lm_head work) are computed only for positions that predict an answer token
    (``answer_only_loss``), which saves time and, above all, memory on large vocabularies. On the unsloth engine,
    whose forward makes its own logits, Unsloth's own fused loss does the same from the labels. The call goes
    through the (DDP-wrapped) model as usual, so data-parallel training still syncs gradients.

    Modules trained in full (``lora_modules_to_save``: embed_tokens, lm_head) get their own, smaller learning
    rate: Unsloth's UnslothTrainer does it on the unsloth engine (``embedding_learning_rate`` in its training
    arguments); on the hf engine an optimizer parameter group does the same.
    """
    from trl import SFTTrainer

    base = SFTTrainer
    if engine == "unsloth" and embedding_learning_rate is not None:
        from unsloth import UnslothTrainer

        base = UnslothTrainer

    class AnswerOnlySFTTrainer(base):  # type: ignore[valid-type, misc]
        real_tokens = 0

        def create_optimizer(self, model=None):
            if embedding_learning_rate is None or base is not SFTTrainer or self.optimizer is not None:
                return super().create_optimizer(model)
            opt_model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls(param_groups(self, opt_model, embedding_learning_rate), **kwargs)
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            mask = inputs.get("attention_mask")
            if model.training:
                self.real_tokens += int(mask.sum()) if mask is not None else labels.numel()
            fed = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
            if engine == "unsloth":
                # Unsloth's forward computes its own logits (every position's); given the
                # labels it computes its own chunked cross-entropy instead and never holds them all. The prompt's
                # labels are -100, so it is the same answer-only loss, summed over num_items_in_batch as below.
                loss = model(**fed, labels=labels, num_items_in_batch=num_items_in_batch, use_cache=False).loss
                if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes
                return (loss, {"loss": loss}) if return_outputs else loss
            loss = answer_only_loss(self, model, fed, labels, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss

    return AnswerOnlySFTTrainer


def param_groups(trainer, model, embedding_learning_rate: float) -> list[dict]:
    """The optimizer's groups: modules trained in full (``modules_to_save``) at the embedding learning rate, the
    rest at the trainer's; weight decay where the trainer decays."""
    decay = set(trainer.get_decay_parameter_names(model))
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(("modules_to_save" in n, n in decay), []).append(p)
    return [{"params": ps, "weight_decay": trainer.args.weight_decay if wd else 0.0,
             **({"lr": embedding_learning_rate} if emb else {})} for (emb, wd), ps in sorted(groups.items())]


def answer_only_loss(trainer, model, fed: dict, labels, num_items_in_batch):
    """Cross-entropy on the answer positions alone. The LM head (a 49k-vocabulary matmul on the embedded model)
    runs only on the hidden states that predict an answer token: a hook on the head gathers them, so the call still
    goes through the whole (DDP- or PEFT-wrapped) model and no prompt or padding position gets logits. A frozen plain
    head then runs with the loss a few hundred rows at a time, keeping no logits (``lean.head_loss``)."""
    import torch
    import torch.nn.functional as F

    from opensem.kernel.lean import head_loss, plain_head

    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][select[:, :-1]]
    head, fired, kept = lm_head_of(model), [], []
    lean = head is not None and plain_head(head)

    def gather(module, args):
        fired.append(True)
        hidden = args[0][select].unsqueeze(0)
        if lean:  # the head's loss keeps no logits (kernel/lean.py): the head gets no rows here, it runs below
            kept.append(hidden[0])
            hidden = hidden[:, :0]
        return (hidden,) + tuple(args[1:])

    hook = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        logits = model(**fed, use_cache=False).logits
    finally:
        if hook is not None:
            hook.remove()
    if kept:
        loss = head_loss(head, kept[0], targets)
    else:
        logits = logits[0] if fired else logits[select]  # a forward that bypasses the head's hook: every position
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
        if trainer.args.average_tokens_across_devices:
            loss = loss * trainer.accelerator.num_processes
        return loss
    return loss / max(1, targets.numel())


def lm_head_of(model):
    """The module the model calls as its LM head (the outermost one named lm_head, through DDP and PEFT wrappers)."""
    for name, module in model.named_modules():
        if name == "lm_head" or name.endswith(".lm_head"):
            return module
    return None


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
