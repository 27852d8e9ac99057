"""RAFT: training examples on the judge's retrieval prompt, the source chunk among distractors at the share p."""

from __future__ import annotations

import json

from conftest import make_workspace, run_cli, set_config

from opensem.workspace import Workspace

DOC = """# Vault

The secret code of the Zorblat vault is 7319. Only two clerks know it.

# Bridge

The Quillon bridge is guarded by Marta Vell, who has kept it for eleven years.

# Lantern

The Tessaly lantern is teal and hangs above the north gate.

# Moons

Planet Orvane has eleven moons; the largest is called Ferrow.
"""

PAIRS = [("What is the code of the Zorblat vault?", "The code is 7319.", "Vault"),
         ("Who guards the Quillon bridge?", "Marta Vell guards it.", "Bridge"),
         ("What colour is the Tessaly lantern?", "It is teal.", "Lantern"),
         ("How many moons does Orvane have?", "Eleven moons.", "Moons")]


def _forge_like(ws, index) -> None:
    """train.jsonl as the forge writes it: each pair with the chunk it came from."""
    by_heading = {p.heading: p.id for p in index.passages}
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
             "metadata": {"chunk_id": by_heading[h], "fact": f"{by_heading[h]}:0"}} for q, a, h in PAIRS * 3]
    rows.append({"conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}]})  # no chunk
    (ws / "data/processed/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / "data/processed/test.jsonl").write_text(json.dumps(rows[0]) + "\n")


def test_a_raft_example_holds_its_source_chunk_or_only_distractors_at_the_configured_share(tmp_path, base_models_dir):
    from opensem.kernel.data import load_conversations
    from opensem.retrieval import Index
    from opensem.train.raft import chunk_ids, raft_conversations

    ws = make_workspace(tmp_path / "ws", base_models_dir)
    (ws / "data/raw/facts.md").write_text(DOC)
    index = Index.build(Workspace(ws))
    _forge_like(ws, index)
    path = ws / "data/processed/train.jsonl"
    convs, sources = load_conversations(path, "conversations"), chunk_ids(path)
    text = {p.id: p.text for p in index.passages}

    def holds_source(out):
        return [text[s] in c[0]["content"] for c, s in zip(out, sources) if s]

    always, counts = raft_conversations(index, convs, sources, 3, 1.0, seed=0)
    assert all(holds_source(always)) and counts == {"with_source": 12, "distractors_only": 0, "unchanged": 1}
    for c, (q, a, _) in zip(always, PAIRS * 3):
        assert c[0]["content"].startswith("Answer the question using the passages below.\n\n[1] ")
        assert c[0]["content"].endswith(f"Question: {q}") and c[0]["content"].count("\n[") == 3  # top_k = 3 passages
        assert c[1] == {"role": "assistant", "content": a}  # the grounded answer, unchanged
    assert always[-1] == convs[-1]  # an example that names no chunk is left as it is
    never, counts = raft_conversations(index, convs, sources, 3, 0.0, seed=0)
    assert not any(holds_source(never)) and counts["distractors_only"] == 12
    assert all(c[0]["content"].count("\n[") == 3 for c in never[:-1])  # still top_k passages, none of them the source
    half, counts = raft_conversations(index, convs, sources, 3, 0.5, seed=0)
    assert counts["with_source"] == sum(holds_source(half)) and 0 < counts["with_source"] < 12
    assert raft_conversations(index, convs, sources, 3, 0.5, seed=0)[0] == half  # the same seed, the same examples


def test_training_with_raft_records_it_and_asks_for_room_for_the_passages(tmp_path, base_models_dir):
    from opensem.retrieval import Index

    ws = make_workspace(tmp_path / "ws", base_models_dir)
    (ws / "data/raw/facts.md").write_text(DOC)
    _forge_like(ws, Index.build(Workspace(ws)))
    set_config(ws, "eval", retrieval={"enabled": False, "top_k": 2})
    set_config(ws, "train", raft={"enabled": True, "p": 0.5}, sequence_len=64, max_steps=2, micro_batch_size=4, run_name="r",
               replay=None, save_steps=100)
    r = run_cli("train", "-w", str(ws))
    assert r.returncode == 2 and "key 'sequence_len'" in r.stderr and "RAFT examples are longer than 64 tokens" in r.stderr, r.stderr[-2000:]
    set_config(ws, "train", sequence_len=512)
    r = run_cli("train", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((ws / "models/adapters/r/manifest.json").read_text())
    raft = m["data"]["raft"]
    assert raft["p"] == 0.5 and raft["top_k"] == 2 and raft["with_source"] + raft["distractors_only"] == 13  # 12 train + 1 test
    assert raft["unchanged"] == 1 and m["config"]["raft"] == {"enabled": True, "p": 0.5}
