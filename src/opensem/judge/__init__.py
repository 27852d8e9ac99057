"""Stages 2 and 4, the Judge: golden set -> promptfoo + 1-5 judge -> Baseline vs Fine-Tuned report."""

from opensem import lazy_names

__getattr__ = lazy_names(__name__, {"run_judge": "opensem.judge.stage", "run_calibration": "opensem.judge.stage"})
__all__ = ['run_calibration', 'run_judge']
