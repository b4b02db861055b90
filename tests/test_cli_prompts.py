"""Prompt files: comments, blank lines, JSON overrides, sidecars, and one clear line for each kind of bad file."""
from __future__ import annotations

import pytest

from ldm.cli.prompts import PromptFileError, read_prompt_file


def write(tmp_path, text, name="prompts.txt", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


def test_lines_comments_blank_lines_and_json_overrides(tmp_path):
    path = write(tmp_path, "\ufeffa red cube\n\n# a comment\n   \n  a blue ball  \n"
                           '{"prompt": "猫", "seed": 7, "scale": 5, "steps": 3, "H": 32, "W": 64, '
                           '"sampler": "Euler a", "negative_prompt": "dark", "eta": 0.5}\n')
    jobs = read_prompt_file(path)
    assert [job.prompt for job in jobs] == ["a red cube", "a blue ball", "猫"]
    assert jobs[0].overrides == {} and jobs[0].source.endswith("line 1")
    assert jobs[2].overrides == {"seed": 7, "scale": 5, "steps": 3, "H": 32, "W": 64, "sampler": "Euler a",
                                 "negative_prompt": "dark", "eta": 0.5}
    assert jobs[2].source == f"{path} line 6"


def test_sidecar_yaml_and_grid_sidecar(tmp_path):
    path = write(tmp_path, "prompt: a cat\nseed: 12\nsteps: 4\nsampler: ddim\nscale: 3.0\nH: 64\nW: 32\neta: 0.0\n"
                           "negative_prompt: ''\nmodel: tiny\nmodel_hash: 0123456789\nvae: null\n", "00003.yaml")
    [job] = read_prompt_file(path)
    assert job.prompt == "a cat" and job.overrides["seed"] == 12 and job.info == {"model": "tiny",
                                                                                  "model_hash": "0123456789"}
    grid = write(tmp_path, "images:\n- {prompt: a, seed: 1, file: samples/00000.png}\n- {prompt: b, seed: 2}\n",
                 "grid-0000.yaml")
    assert [(job.prompt, job.overrides["seed"]) for job in read_prompt_file(grid)] == [("a", 1), ("b", 2)]


@pytest.mark.parametrize("content, message", [
    ("a\n{\"prompt\": \"x\", \"seed\": }\n", r"prompts.txt line 2: malformed JSON \(Expecting value at column 25\)"),
    ("# only a comment\n\n", "has no prompts"),
    ("", "has no prompts"),
    ('{"prompt": "x", "sede": 3}\n', "line 1: unknown key 'sede'; allowed keys: prompt, negative_prompt, seed"),
    ('{"prompt": "x", "seed": 1.5}\n', "line 1: seed must be an integer, got 1.5"),
    ('{"prompt": "x", "steps": true}\n', "line 1: steps must be an integer, got True"),
    ('{"prompt": "x", "scale": "high"}\n', "line 1: scale must be a number"),
    ('{"seed": 3}\n', "line 1: needs a non-empty string 'prompt'"),
    ('{"prompt": "x"} and more\n', r"line 1: malformed JSON \(Extra data at column 17\)"),
])
def test_bad_prompt_files_give_one_line(tmp_path, content, message):
    with pytest.raises(PromptFileError, match=message) as caught:
        read_prompt_file(write(tmp_path, content))
    assert "\n" not in str(caught.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(PromptFileError, match="is not UTF-8 \\(byte 0xe9 on line 2\\): save it as UTF-8"):
        read_prompt_file(write(tmp_path, "ok\ncaf\xe9\n", encoding="latin-1"))
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompt_file(str(tmp_path / "absent.txt"))
    with pytest.raises(PromptFileError, match="is a directory"):
        read_prompt_file(str(tmp_path))
    with pytest.raises(PromptFileError, match="not valid yaml"):
        read_prompt_file(write(tmp_path, "prompt: [unclosed\n", "bad.yaml"))
