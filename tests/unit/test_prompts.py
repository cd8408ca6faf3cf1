import pytest

from svi_infer.prompts import PromptError, load_prompts, parse_prompts, prompt_for_clip


def test_text_file_with_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# story\nfirst scene\n\n  # indented comment\nsecond scene  \n", encoding="utf-8")
    assert load_prompts(str(path)) == ["first scene", "second scene"]


def test_json_list_file_and_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('["a", " b ", ""]', encoding="utf-8")
    assert load_prompts(str(path)) == ["a", "b"]
    assert load_prompts(["x", "y"]) == ["x", "y"]


def test_literal_prompt():
    assert load_prompts("a boat sails on the sea") == ["a boat sails on the sea"]


def test_errors(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(PromptError, match="no prompt"):
        load_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PromptError, match="cannot read"):
        load_prompts(str(tmp_path / "bad.json"))
    with pytest.raises(PromptError, match="strings only"):
        parse_prompts("[1, 2]")


def test_prompt_schedule():
    prompts = ["a", "b", "c"]
    assert [prompt_for_clip(prompts, k) for k in range(4)] == ["a", "b", "c", "a"]
    assert [prompt_for_clip(prompts, k, repeat_times=2) for k in range(5)] == ["a", "a", "b", "b", "c"]
    assert [prompt_for_clip(prompts, k, first_only=True) for k in range(3)] == ["a", "a", "a"]
