"""The training kernel that the instruction-tuning (train/), continued pre-training (cpt/) and preference (prefs/)
recipes share: run.py (the steps of a run), engines.py (Unsloth or transformers+PEFT), hardware.py (profiles),
data.py (chat template, answer-only labels, replay) and plan.py (the number of steps)."""
