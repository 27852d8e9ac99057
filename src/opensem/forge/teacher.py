"""The teacher as configs/forge_config.yaml sets it up: its price per token and how its prompts are counted. The
forge and continued pre-training's rewrites both pay for teacher calls through these."""

from __future__ import annotations

from opensem.forge.config import ForgeConfig
from opensem.errors import ConfigError
from opensem.forge.documents import count_tokens
from opensem.workspace import Workspace


def teacher_price(cfg: ForgeConfig):
    """The teacher's price; a budget with no known price is refused before any call."""
    if cfg.teacher.in_process():
        return None
    model = cfg.teacher.resolved_model()
    price = cfg.cost.price_for(model)
    if price is None and cfg.cost.max_cost_usd is not None:
        raise ConfigError(
            f"configs/forge_config.yaml: key 'cost.max_cost_usd' is set but no price is known for model {model!r}, so the "
            f"budget cannot be enforced: add cost.prices.{model}: {{input_per_mtok: ..., output_per_mtok: ...}} "
            f"(0 and 0 for a free local server), or set cost.max_cost_usd: null"
        )
    return price


MESSAGE_OVERHEAD = 4  # role markers and separators per message, as chat APIs count them


def prompt_counter(ws: Workspace, cfg: ForgeConfig):
    """Tokens of one request's messages: the teacher's own tokenizer and chat template where the teacher is
    local, else the character-based estimate."""
    if cfg.teacher.in_process():
        from opensem.models import resolve_base_model

        from opensem.inference import PromptChecker

        return PromptChecker(resolve_base_model(cfg.teacher.resolved_model(), ws.base_models_dir).path).tokens
    return lambda msgs: sum(count_tokens(m["content"]) + MESSAGE_OVERHEAD for m in msgs)
