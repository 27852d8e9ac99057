"""What teacher calls cost, and a budget that is a hard limit.

``Costs`` adds up the tokens and dollars of every reply (cached replies were paid for in an earlier run).
``Budget.may_start`` is given to ``complete_many``: a call starts only when what was spent in this run,
plus the worst case of every call still in flight, plus this call's worst case (its estimated prompt
with a margin and all of ``max_tokens``) stays within ``max_cost_usd``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from opensem.config import Price
from opensem.llm.base import Call, LLMReply

PROMPT_MARGIN = 1.25  # the prompt estimate is a character-based count: allow for it being low


def usd(price: Optional[Price], input_tokens: float, output_tokens: float) -> float:
    if price is None:
        return 0.0
    return input_tokens / 1e6 * price.input_per_mtok + output_tokens / 1e6 * price.output_per_mtok


@dataclass
class Costs:
    price: Optional[Price] = None
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0
    new_usd: float = 0.0  # spent in this run (cached replies were paid for before)
    calls: int = 0
    cached: int = 0
    estimated: int = 0  # replies without usage from the server: their tokens counted here

    def add(self, reply: LLMReply) -> None:
        self.input_tokens += reply.input_tokens
        self.output_tokens += reply.output_tokens
        cost = usd(self.price, reply.input_tokens, reply.output_tokens)
        self.usd += cost
        if reply.cached:
            self.cached += 1
        else:
            self.calls += 1
            self.new_usd += cost


@dataclass
class Budget:
    """Reserves each call's worst case before it starts; ``settle`` releases it when the call is done."""

    costs: Costs
    max_usd: Optional[float]
    count_prompt: Callable[[list[dict]], int]  # tokens of a request's messages
    reserved: dict[int, float] = field(default_factory=dict)

    def worst_case(self, c: Call) -> float:
        prompt = self.count_prompt(c.messages) * PROMPT_MARGIN
        return usd(self.costs.price, prompt, c.max_tokens or 0)

    def may_start(self, c: Call) -> Optional[str]:
        if self.max_usd is None:
            return None
        need = self.worst_case(c)
        if self.costs.new_usd + sum(self.reserved.values()) + need > self.max_usd:
            return (f"max_cost_usd {self.max_usd} reached: ${self.costs.new_usd:.4f} spent in this run, "
                    f"the next call could cost up to ${need:.4f}")
        self.reserved[id(c)] = need
        return None

    def settle(self, c: Call) -> None:
        self.reserved.pop(id(c), None)
        if c.reply is None:
            return
        if not c.reply.cached and not c.reply.input_tokens and not c.reply.output_tokens:
            # a server that reports no usage is charged what the budget reserved for the prompt (the same estimate,
            # with its margin) and the reply's text counted here: never $0
            c.reply.input_tokens = round(self.count_prompt(c.messages) * PROMPT_MARGIN)
            c.reply.output_tokens = round(self.count_prompt([{"role": "assistant", "content": c.reply.text}]) * PROMPT_MARGIN)
            c.reply.meta["usage_estimated"] = True
            self.costs.estimated += 1
        self.costs.add(c.reply)
