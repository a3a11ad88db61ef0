from __future__ import annotations

import json

from ray_pipeline.data import synthetic
from ray_pipeline.data.prompts import Prompt


def test_committed_quickstart_data_matches_the_generator(root, tmp_path):
    """configs/data/quickstart/ is exactly what the generator writes (no hand edits, no drift)."""
    written = synthetic.write_quickstart_files(tmp_path)
    for name, path in written.items():
        committed = root / "configs" / "data" / "quickstart" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} differs from the generator ({name})"
        )


def test_quickstart_task_properties(root):
    test = [
        json.loads(x)
        for x in (root / "configs/data/quickstart/test.jsonl").read_text().splitlines()
    ]
    assert len(test) == 200
    share = sum(r["label"] == "1" for r in test) / len(test)
    assert 0.4 < share < 0.6  # about balanced: the majority baseline is near 50%
    assert all(synthetic.true_label(r["input"]) == r["label"] for r in test)
    logs = (root / "configs/data/quickstart/logs.jsonl").read_text()
    assert not {r["input"] for r in test} & set(logs.splitlines())


def test_teacher_errors_at_the_configured_rate():
    texts = synthetic.generate_comments(2000, seed=3)
    wrong = sum(synthetic.teacher_label(t, 0.1) != synthetic.true_label(t) for t in texts)
    assert 150 < wrong < 250
    assert all(synthetic.teacher_label(t, 0.0) == synthetic.true_label(t) for t in texts[:100])


def test_quickstart_prompt_is_the_logged_one(root, in_root):
    from ray_pipeline.config import load_config

    cfg = load_config(root / "configs/quickstart.yaml")
    assert cfg.task.prompt.text() == synthetic.PROMPT


def test_prompt_render_and_extract():
    p = Prompt("Text: '%s'\nAnswer:", "%s", system="You label things.")
    msgs = p.messages("a {b} 'c'")
    assert msgs[0] == {"role": "system", "content": "You label things."}
    assert p.extract(msgs[1]["content"]) == "a {b} 'c'"
    assert p.extract("something else") is None
    assert p.hash != Prompt("Text: '%s'\nAnswer:", "%s").hash


def test_the_quickstart_config_spells_out_the_synthetic_task(root, in_root):
    from ray_pipeline.config import TaskSection, load_config

    assert load_config(root / "configs/quickstart.yaml").task == TaskSection.model_validate(
        synthetic.TASK
    )
