"""The command line as a user meets it: results, and one-line errors for bad input."""

import json

import pytest

from helpers import assert_one_line_error, cli

RUN_KEYS = {"model", "backend", "batch_size", "prompt_len", "gen_len", "n_params", "weight_bytes",
            "kv_cache_bytes", "prompt_time_s", "prompt_flops", "decode_time_per_token_s", "token_throughput",
            "token_flops", "decode_weight_gbps", "peak_rss_bytes", "threads", "torch_version", "cpu"}


def test_run_prints_the_reference_table():
    p = cli("run", "--model", "tiny-gptj", "--prompt-len", "16", "--gen-len", "8", "--batch-size", "2",
            "--backend", "eager")
    assert p.returncode == 0, p.stderr
    header = next(line for line in p.stdout.splitlines() if line.startswith("| Batch size"))
    for col in ("Prompt time", "Prompt FLOPS", "Generate time per token per batch", "Token throughput",
                "Token FLOPS", "Decode weight GB/s", "Peak RSS"):
        assert col in header
    row = [line for line in p.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(row) == 1
    assert "needs" in p.stderr  # the memory a run needs, said before allocating


def test_run_json_has_every_contract_key():
    p = cli("run", "--model", "tiny-gptj", "--prompt-len", "12", "--gen-len", "6", "--batch-size", "3",
            "--backend", "eager", "--json", "-")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert RUN_KEYS <= rec.keys()
    assert rec["batch_size"] == 3 and rec["prompt_len"] == 12 and rec["gen_len"] == 6
    assert rec["backend"] == "eager" and rec["decode_steps"] == 5
    # the derived figures follow from the measured times by the documented formulas
    assert rec["token_throughput"] == pytest.approx(3 / rec["decode_time_per_token_s"])
    assert rec["prompt_flops"] == pytest.approx(3 * rec["prompt_flop_per_seq"] / rec["prompt_time_s"])
    assert rec["token_flops"] == pytest.approx(rec["token_throughput"] * rec["token_flop_per_seq"])
    assert rec["peak_rss_bytes"] > rec["weight_bytes"]


def test_one_generated_token_times_the_prompt_alone():
    # --gen-len 1: no decode step. Its decode figures are null (strict JSON: no NaN), "-" in the
    # table; the prompt pass is measured and set against the limits like any other
    def strict(c):
        raise ValueError(f"{c} in the record")

    p = cli("run", "--model", "tiny-gptj", "--prompt-len", "16", "--gen-len", "1", "--batch-size", "2",
            "--backend", "eager", "--json", "-")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout, parse_constant=strict)
    assert rec["decode_steps"] == 0
    for k in ("decode_time_per_token_s", "token_throughput", "token_flops", "decode_weight_gbps", "decode_efficiency",
              "decode_time_min_s", "token_throughput_min"):
        assert rec[k] is None, k
    assert rec["prompt_flops"] == pytest.approx(2 * rec["prompt_flop_per_seq"] / rec["prompt_time_s"])
    assert rec["prefill_efficiency"] > 0
    p = cli("run", "--model", "tiny-gptj", "--prompt-len", "16", "--gen-len", "1", "--batch-size", "2",
            "--backend", "eager")
    assert p.returncode == 0, p.stderr
    (row,) = [line.split(" | ") for line in p.stdout.splitlines() if line.startswith("| 2 |")]
    assert row[1].endswith(" s") and row[3:8] == ["-"] * 5, row  # prompt time; decode's five figures
    assert "Decode step times: none" in p.stdout


def test_json_to_a_file_and_layers(tmp_path):
    out = tmp_path / "r.json"
    p = cli("run", "--model", "gptj-1b", "--layers", "1", "--prompt-len", "8", "--gen-len", "3", "--json", out,
            "--backend", "eager")
    assert p.returncode == 0, p.stderr
    rec = json.loads(out.read_text())
    assert rec["n_layer"] == 1 and rec["model"] == "gptj-1b"
    assert "| 1 |" in p.stdout


@pytest.mark.parametrize("args, fragments", [
    (["run", "--model", "gptj-7b"], ["unknown model 'gptj-7b'", "gptj-6b"]),
    (["run", "--model", "tiny-gptj", "--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["run", "--model", "tiny-gptj", "--prompt-len", "100", "--gen-len", "100"], ["128 positions"]),
    (["run", "--model", "tiny-gptj", "--prompt-len", "8", "--gen-len", "2", "--layers", "3"], ["--layers", "1..2"]),
    (["run", "--model", "tiny-gptj", "--prompt-len", "8", "--gen-len", "2", "--backend", "tpu"], ["unknown backend 'tpu'"]),
    (["run", "--model", "./no/such/dir"], ["no such file or directory"]),
    (["run", "--model", "tiny-gptj", "--batch-size", "two"], ["expected a number or auto"]),
    (["run", "--nonsense"], ["unrecognized arguments"]),
    (["generate", "--model", "tiny-gptj", "--prompt-ids", "1,2,999"], ["token id 999", "0..255"]),
    (["generate", "--model", "tiny-gptj", "--prompt-ids", "1,x"], ["comma-separated integers"]),
    (["generate", "--model", "tiny-gptj", "--prompt", "hello"], ["tokenizer.json", "--prompt-ids"]),
    (["generate", "--model", "tiny-gptj"], ["--prompt"]),
    (["generate", "--model", "tiny-gptj", "--prompt-ids", "1", "--max-new-tokens", "200"], ["128 positions"]),
    (["generate", "--model", "tiny-gptj", "--prompt-ids", "1", "--top-p", "0"], ["--top-p"]),
])
def test_bad_input_is_one_line(args, fragments):
    assert_one_line_error(cli(*args), *fragments)


def test_malformed_config_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "n_layer": ')
    assert_one_line_error(cli("run", "--model", bad), "not valid JSON")
    wrong = tmp_path / "wrong.json"
    cfg = json.loads((cli.__globals__["ROOT"] / "configs" / "tiny-gptj.json").read_text())
    wrong.write_text(json.dumps({**cfg, "n_head": 0}))
    assert_one_line_error(cli("run", "--model", wrong), "n_head must be a positive integer")
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({**cfg, "n_heads": 4}))
    assert_one_line_error(cli("run", "--model", extra), "unknown config keys n_heads")


def test_unsupported_architecture_config(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    assert_one_line_error(cli("run", "--model", f), "unsupported architecture", "GPTJForCausalLM")


def test_generate_json_and_text_views():
    p = cli("generate", "--model", "tiny-gptj", "--prompt-ids", "3,4,5", "--prompt-ids", "7",
            "--max-new-tokens", "4", "--ignore-eos", "--json", "-")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert [len(t) for t in out["tokens"]] == [4, 4] and out["text"] is None
    plain = cli("generate", "--model", "tiny-gptj", "--prompt-ids", "3,4,5", "--prompt-ids", "7",
                "--max-new-tokens", "4", "--ignore-eos")
    assert plain.stdout.splitlines() == [",".join(map(str, t)) for t in out["tokens"]]
