"""The client commands (`complete`, `chat`, `files`, `finetune`, `curve`, `models`, `usage`,
`tokenize`, `bench`) in-process against a live server with a learnable tiny model and a worker
thread; errors are one `shoal: error:` line and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import ast
import io
import json
import xml.etree.ElementTree as ET

import httpx
import openai
import pytest

from shoal.cli import COMMANDS, main
from shoal.cli.bench import percentile
from shoal.cli.finetune import Progress
from shoal.cli.remote import api_key, base_url
from tests.api.conftest import free_port
from tests.api.test_fine_tuning import ft, toy_jsonl  # noqa: F401  (module-scoped fixture)
from tests.api.test_learning_curves import task_jsonl


@pytest.fixture(scope="module")
def conn(ft):  # noqa: F811
    return ["--base-url", ft["url"] + "/v1", "--api-key", ft["keys"]["acme"]]


def run(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_complete_streams_the_text_and_prints_usage(ft, conn, capsys):  # noqa: F811
    c = openai.OpenAI(base_url=ft["url"] + "/v1", api_key=ft["keys"]["acme"], max_retries=0)
    want = c.completions.create(model="tiny", prompt="Review: fox\nLabel:", max_tokens=6,
                                temperature=0).choices[0].text
    rc, out, err = run(capsys, "complete", "Review: fox\nLabel:", "--max-tokens", 6,
                       "--temperature", 0, *conn)
    assert rc == 0 and out == want + "\n"
    assert err.startswith("[tiny: ") and "completion tokens" in err and "finish:" in err
    rc, out, err = run(capsys, "complete", "Hi", "--model", "tiny", "--n", 2, "--max-tokens", 3,
                       "--logprobs", 2, "--seed", 1, "--stop", "zz", "--top-p", 0.9, *conn)
    assert rc == 0 and "--- choice 1 ---" in out
    assert "LOGPROB" in err and "completion tokens" in err


def test_complete_unknown_model_is_one_line(conn, capsys):
    rc, out, err = run(capsys, "complete", "hi", "--model", "nope", *conn)
    assert rc != 0 and "nope" in one_error_line(err) and "(param model)" in err


def test_unreachable_server_is_one_line(capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    for argv in (["complete", "hi"], ["usage"], ["finetune", "list"]):
        rc, _, err = run(capsys, *argv, "--base-url", url)
        line = one_error_line(err)
        assert rc != 0 and line == f"shoal: error: cannot reach the server at {url}: " \
                                   f"is `shoal serve` running?"


def test_a_bad_key_says_how_to_give_one(ft, capsys):  # noqa: F811
    rc, _, err = run(capsys, "models", "--base-url", ft["url"] + "/v1", "--api-key", "sk-wrong")
    assert rc != 0 and "--api-key" in one_error_line(err)


def test_chat_with_piped_stdin_keeps_the_conversation(conn, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nhow are you?\n/exit\nnot read\n"))
    rc, out, err = run(capsys, "chat", "--system", "Be brief.", "--max-tokens", 4,
                       "--temperature", 0, *conn)
    assert rc == 0 and out.endswith("\n")
    assert "[tiny: 2 turn(s)" in err

    def prompt_tokens(stdin: str) -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        err = run(capsys, "chat", "--max-tokens", 4, "--temperature", 0, *conn)[2]
        return int(err.split(", ")[1].split()[0])

    # the second turn's prompt holds the first exchange
    assert prompt_tokens("hello\nhello\n") > 2 * prompt_tokens("hello\n")


def test_json_mode_from_the_command_line(conn, capsys, monkeypatch):
    """`--json` on complete and chat: the answer is one JSON object (a prefix of one when cut),
    and a prompt that does not ask for JSON is one error line naming it."""
    from shoal.engine.json_guide import START, feed

    rc, out, err = run(capsys, "complete", "JSON please:", "--json", "--max-tokens", 30, "--seed", 2, *conn)
    assert rc == 0 and out.lstrip().startswith("{") and feed(START, out.rstrip("\n").encode())
    monkeypatch.setattr("sys.stdin", io.StringIO("answer in json\n/exit\n"))
    rc, out, err = run(capsys, "chat", "--json", "--max-tokens", 30, "--temperature", 0, *conn)
    assert rc == 0 and out.lstrip().startswith("{") and feed(START, out.rstrip("\n").encode())
    rc, out, err = run(capsys, "complete", "hello", "--json", *conn)
    assert rc != 0 and "prompt: must contain the word 'json'" in one_error_line(err)


def test_schema_from_the_command_line(conn, capsys, monkeypatch, tmp_path):
    """`--schema FILE`: each answer an instance of the schema (a prefix of one when cut); a file
    that is not JSON, or a schema the server cannot enforce, is one error line."""
    from shoal.engine.json_schema import Grammar

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    path = tmp_path / "answer.schema.json"
    path.write_text(json.dumps(schema))
    g = Grammar(schema)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    rc, out, err = run(capsys, "chat", "--schema", path, "--max-tokens", 60, "--temperature", 0, *conn)
    assert rc == 0 and g.feed(g.start, out.rstrip("\n").encode())
    rc, out, err = run(capsys, "complete", "x", "--schema", path, "--max-tokens", 60, "--seed", 3, *conn)
    assert rc == 0 and g.feed(g.start, out.rstrip("\n").encode())
    path.write_text("{not json")
    rc, out, err = run(capsys, "complete", "x", "--schema", path, *conn)
    assert rc != 0 and "--schema: cannot read a JSON schema" in one_error_line(err)
    path.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}))
    rc, out, err = run(capsys, "complete", "x", "--schema", path, *conn)
    assert rc != 0 and "'minimum'" in one_error_line(err)


def test_files_upload_list_rm(conn, tmp_path, capsys):
    path = tmp_path / "toy.jsonl"
    path.write_bytes(toy_jsonl())
    rc, out, err = run(capsys, "files", "upload", path, *conn)
    file_id = out.strip()
    assert rc == 0 and file_id.startswith("file-") and "purpose fine-tune" in err
    rc, out, _ = run(capsys, "files", "list", *conn)
    assert rc == 0 and file_id in out and "toy.jsonl" in out
    rc, out, _ = run(capsys, "files", "rm", file_id, *conn)
    assert rc == 0 and out.strip() == f"deleted {file_id}"
    assert file_id not in run(capsys, "files", "list", *conn)[1]
    rc, _, err = run(capsys, "files", "rm", file_id, *conn)
    assert rc != 0 and file_id in one_error_line(err)
    rc, _, err = run(capsys, "files", "upload", tmp_path / "missing.jsonl", *conn)
    assert rc != 0 and "no such file" in one_error_line(err)


def test_finetune_follow_to_a_model_then_models_list_rm(conn, tmp_path, capsys):
    path = tmp_path / "toy.jsonl"
    path.write_bytes(toy_jsonl())
    rc, out, err = run(capsys, "finetune", "create", path, "--model", "tiny", "--epochs", 2,
                       "--lr-multiplier", 10, "--seed", 3, "--suffix", "cli", "--follow", *conn)
    assert rc == 0, err
    lines = out.strip().splitlines()
    job_id, model = lines[0], lines[-1].removeprefix("model: ")
    assert job_id.startswith("ftjob-") and lines[-2] == "status: succeeded"
    assert model.startswith("ft:tiny:acme:cli:")
    assert "[####################] epoch 2/2 step 24/24 loss" in err  # progress, one line per 10%
    assert 1 <= err.count("] epoch ") <= 12 and "\r" not in err
    assert "Files validated" in err and "New fine-tuned model created" in err
    rc, out, _ = run(capsys, "finetune", "list", *conn)
    assert rc == 0 and job_id in out and model in out
    rc, out, _ = run(capsys, "models", "list", *conn)
    assert rc == 0 and out.splitlines()[1].startswith("tiny ") and model in out
    assert run(capsys, "complete", "Review: fox\nLabel:", "--model", model, *conn)[0] == 0
    rc, out, _ = run(capsys, "models", "rm", model, *conn)
    assert rc == 0 and out.strip() == f"deleted {model}"
    assert model not in run(capsys, "models", *conn)[1]
    rc, _, err = run(capsys, "models", "rm", "tiny", *conn)
    assert rc != 0 and "cannot be deleted" in one_error_line(err)


def test_finetune_bad_file_fails_naming_the_line(conn, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\nnot json\n' * 6)
    rc, out, err = run(capsys, "finetune", "create", path, "--model", "tiny", "--follow", *conn)
    assert rc == 1 and "status: failed" in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("shoal: error: ") and "line 2" in last.lower()
    assert "Traceback" not in err


def test_finetune_cancel_and_follow(conn, tmp_path, capsys):
    path = tmp_path / "toy.jsonl"
    path.write_bytes(toy_jsonl())
    path_id = run(capsys, "files", "upload", path, *conn)[1].strip()
    rc, out, err = run(capsys, "finetune", "create", path_id, "--model", "tiny", "--epochs", 25, *conn)
    job_id = out.strip()
    assert rc == 0 and job_id.startswith("ftjob-") and "follow it" in err
    rc, out, _ = run(capsys, "finetune", "cancel", job_id, *conn)
    assert rc == 0 and out.startswith(f"{job_id}: cancel requested")
    rc, out, err = run(capsys, "finetune", "follow", job_id, *conn)
    assert rc == 1 and out.strip() == "status: cancelled"
    assert err.strip().splitlines()[-1] == f"shoal: error: job {job_id} cancelled"
    rc, _, err = run(capsys, "finetune", "follow", "ftjob-nope", *conn)
    assert rc != 0 and "ftjob-nope" in one_error_line(err)
    rc, _, err = run(capsys, "finetune", "create", "nothing-here.jsonl", "--model", "tiny", *conn)
    assert rc != 0 and "neither a local file nor a file id" in one_error_line(err)


def test_curve_prints_points_fit_and_writes_the_plot(conn, tmp_path, capsys):
    path = tmp_path / "task.jsonl"
    path.write_bytes(task_jsonl(40))
    svg = tmp_path / "curve.svg"
    rc, out, err = run(capsys, "curve", path, "--model", "tiny", "--sizes", "10,20", "--epochs", 2,
                       "--seed", 11, "--target-error", 0.05, "--out", svg, *conn)
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:3] == ["N", "ERROR", "VALID_LOSS"]
    assert [r[0] for r in rows[1:3]] == ["10", "20"] and all(r[3] == "succeeded" for r in rows[1:3])
    assert "fit: e = " in out and "prediction: " in out and f"plot: {svg}" in out
    ET.parse(svg)
    assert "point 2/2 (n=20" in err and "[2/2 done]" in err
    rc, _, err = run(capsys, "curve", path, "--model", "tiny", "--sizes", "20,10", *conn)
    assert rc != 0 and "sizes" in one_error_line(err.split("\n", 1)[1])  # after "uploaded ..."


def test_usage_tokenize_and_bench(ft, conn, capsys):  # noqa: F811
    rc, out, _ = run(capsys, "usage", "--days", 2, *conn)
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:3] == ["DAY", "MODEL", "REQUESTS"]
    assert any(" tiny " in line for line in lines) and lines[-1].startswith("total ")
    rc, out, _ = run(capsys, "tokenize", "hello world", *conn)
    want = httpx.post(ft["url"] + "/v1/tokenize", json={"model": "tiny", "prompt": "hello world"},
                      headers={"authorization": f"Bearer {ft['keys']['acme']}"}).json()
    rows = [line.split(maxsplit=2) for line in out.splitlines()[2:]]
    assert rc == 0 and out.startswith(f"{want['count']} tokens (tiny, context 512)")
    assert [int(r[1]) for r in rows] == want["tokens"]
    assert "".join(ast.literal_eval(r[2]) for r in rows) == "hello world"
    rc, out, _ = run(capsys, "bench", "--requests", 4, "--concurrency", 2, "--max-tokens", 4, "--json",
                     *conn)
    r = json.loads(out)
    assert rc == 0 and r["completed"] == 4 and r["failed"] == 0 and r["output_tokens"] == 16
    assert r["ttft_p50_ms"] > 0 and r["itl_p99_ms"] >= r["itl_p50_ms"] > 0
    rc, out, _ = run(capsys, "bench", "--requests", 2, "--concurrency", 2, "--max-tokens", 2, *conn)
    assert rc == 0 and "TTFT p99 (ms)" in out and "output tok/s" in out


def test_progress_bar_in_place_on_a_tty_and_by_tenths_otherwise():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, plain = Tty(), io.StringIO()
    for out in (tty, plain):
        p = Progress(out, width=10)
        for i in range(101):
            p.update(i / 100, f"step {i}/100")
        p.message("done")
        p.close()
    assert tty.getvalue().count("\r") > 100 and "[##########] step 100/100" in tty.getvalue()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 12 and lines[0] == "[..........] step 0/100" and lines[-1] == "done"
    assert percentile([3, 1, 2], 50) == 2 and percentile([], 99) is None


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0 and "usage: shoal" in capsys.readouterr().out


def test_connection_defaults_come_from_the_environment(ft, capsys, monkeypatch):  # noqa: F811
    for name in ("SHOAL_BASE_URL", "OPENAI_BASE_URL", "SHOAL_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    bare = argparse.Namespace(base_url=None, api_key=None)
    assert (base_url(bare), api_key(bare)) == ("http://127.0.0.1:8000/v1", "EMPTY")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://elsewhere/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert (base_url(bare), api_key(bare)) == ("http://elsewhere/v1", "sk-openai")
    monkeypatch.setenv("SHOAL_BASE_URL", ft["url"] + "/v1")
    monkeypatch.setenv("SHOAL_API_KEY", ft["keys"]["beta"])
    rc, out, _ = run(capsys, "models")
    assert rc == 0 and "tiny" in out and "acme" not in out
