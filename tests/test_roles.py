"""Parameter roles and the artifact's architecture. Every parameter of every preset has exactly one
optimiser group and one storage rule, and a parameter added without one stops the run; every knob
that changes the model's parameters or forward is declared with arch(), stored in the artifact and
restored from it by EVAL_ONLY (a knob that is not would silently rebuild a different model)."""

import dataclasses

import pytest
import torch

from train_gpt import (CPU_RUNTIME_FOR_TESTS, GPT, PARAMETER_ROLES, PRESETS, ConfigError, Context, Hyperparameters,
                       artifact_meta, dequantize_state_dict, model_from_artifact, pack_artifact, parameter_groups,
                       parameter_role, quant_spec_for, quantize_state_dict, run_switches)

# Parameter names do not depend on the width: every preset at 64 wide keeps all its features.
NARROW = dict(MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", VE_DIM="16", BIGRAM_DIM="16")


def preset_model(name: str, **env) -> GPT:
    return GPT(Hyperparameters.from_env({"PRESET": name, **NARROW, **env}))


@pytest.mark.parametrize("name, env", [(p, {}) for p in PRESETS] + [("pr754", {"TIE_EMBEDDINGS": "0"})])
def test_every_parameter_has_one_group_and_one_storage_rule(name, env):
    model = preset_model(name, **env)
    groups = parameter_groups(model)
    grouped = [n for members in groups.values() for n, _ in members]
    assert sorted(grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each once
    for n, p in model.named_parameters():
        role = parameter_role(n, model.args)
        assert role.optimizer in groups and role.storage in ("matrix", "embed", "fp16", "fp32"), n
        assert role.optimizer != "matrix" or p.ndim == 2, n  # Muon only sees matrices
    qstate = quantize_state_dict(model.state_dict(), model.args)
    stored = list(qstate["q"]) + list(qstate["passthrough"])
    assert sorted(stored) == sorted(model.state_dict())


def test_a_parameter_without_a_role_stops_the_run():
    model = preset_model("pr2005")
    model.new_gate = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(RuntimeError, match="new_gate matches 0 entries of PARAMETER_ROLES"):
        parameter_groups(model)
    with pytest.raises(RuntimeError, match="new_gate"):
        quantize_state_dict(model.state_dict(), model.args)


def test_a_parameter_with_two_roles_stops_the_run(monkeypatch):
    monkeypatch.setattr("train_gpt.PARAMETER_ROLES", PARAMETER_ROLES + ((r"skip_\w+", PARAMETER_ROLES[0][1]),))
    with pytest.raises(RuntimeError, match="skip_weights matches 2 entries"):
        parameter_role("skip_weights", Hyperparameters.from_env({}))


def test_roles_by_hand():
    """A few entries written out, so that a change to the table is a deliberate one; the three that
    depend on the configuration, both ways."""
    pr754, pr1232 = Hyperparameters.from_env({"PRESET": "pr754"}), Hyperparameters.from_env({"PRESET": "pr1232"})
    expect = {"tok_emb.weight": ("embed", "embed", "head"), "lm_head.weight": ("head", "embed", "head"),
              "blocks.3.attn.c_q.weight": ("matrix", "matrix", "own"), "blocks.10.mlp.proj.weight": ("matrix", "matrix", "own"),
              "blocks.0.resid_mix": ("scalar", "fp32", None), "blocks.2.attn.q_gain": ("scalar", "fp32", None),
              "skip_gates": ("scalar", "fp32", None), "bigram.table.weight": ("embed", "matrix", None),
              "bigram.proj.weight": ("scalar", "matrix", None), "recur_gates": ("scalar", "fp32", None)}
    for name, (group, storage, hessian) in expect.items():
        assert dataclasses.astuple(parameter_role(name, pr754)) == (group, storage, hessian), name
    assert dataclasses.astuple(parameter_role("blocks.0.resid_mix", pr1232)) == ("scalar", "fp16", None)
    assert dataclasses.astuple(parameter_role("bigram.table.weight", pr1232)) == ("embed", "embed", None)
    assert dataclasses.astuple(parameter_role("bigram.proj.weight", pr1232)) == ("matrix", "matrix", None)
    assert quant_spec_for("tok_emb.weight", torch.zeros(1024, 512), pr754) is None  # EMBED_BITS=16: bf16
    args = Hyperparameters.from_env({"PRESET": "pr2005"})
    w = torch.zeros(8192, 512)
    assert quant_spec_for("tok_emb.weight", w, args).bits == 7 and quant_spec_for("blocks.0.mlp.fc.weight", w, args).bits == 6
    assert quant_spec_for("blocks.0.mlp.fc.weight", torch.zeros(256, 256), args) is None  # 65,536: stored fp16


def test_clip_sigmas_per_matrix_group():
    """MLP_CLIP_SIGMAS and ATTN_CLIP_SIGMAS for the blocks' MLP and attention matrices, MATRIX_CLIP_SIGMAS
    for the other matrices (and for a group whose own k is 0), EMBED_CLIP_SIGMAS for the embedding."""
    args = Hyperparameters.from_env({"PRESET": "pr2005", "MLP_CLIP_SIGMAS": "11.5", "ATTN_CLIP_SIGMAS": "13",
                                     "MATRIX_CLIP_SIGMAS": "12.85", "EMBED_CLIP_SIGMAS": "14", "BIGRAM_VOCAB_SIZE": "512"})
    w = torch.zeros(1024, 512)
    sigmas = {name: quant_spec_for(name, w, args).sigmas for name in (
        "blocks.3.mlp.fc.weight", "blocks.3.mlp.proj.weight", "blocks.0.attn.c_q.weight", "blocks.10.attn.proj.weight",
        "bigram.proj.weight", "tok_emb.weight")}
    assert sigmas == {"blocks.3.mlp.fc.weight": 11.5, "blocks.3.mlp.proj.weight": 11.5, "blocks.0.attn.c_q.weight": 13.0,
                      "blocks.10.attn.proj.weight": 13.0, "bigram.proj.weight": 12.85, "tok_emb.weight": 14.0}
    assert quant_spec_for("blocks.3.mlp.fc.weight", w, args.replace("test", mlp_clip_sigmas=0.0)).sigmas == 12.85


# Every feature on, in two configurations (block attention residuals need physical layers, so they
# exclude recurrence), and every architecture knob away from its value in CONFIGURED in at least one.
COMMON = dict(PRESET="baseline", VOCAB_SIZE="64", NUM_LAYERS="5", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2",
              MLP_MULT="3", TIE_EMBEDDINGS="0", LOGIT_SOFTCAP="20", ROPE_BASE="5000", UNET_SKIPS="1", ROPE_DIMS="4",
              LN_SCALE="1", XSA_LAST_N="3", GATED_ATTN="1", VALUE_RESIDUAL="1", VE_ENABLED="1", VE_DIM="8",
              VE_LAYERS="3,4", SMEAR_GATE="1", BIGRAM_VOCAB_SIZE="32", BIGRAM_DIM="8", MLP_ACT="leaky2",
              LEAKY_SLOPE="0.3", SKIP_GATES="1", PARALLEL_RESIDUAL_START="3", PARALLEL_RESIDUAL_GATE="1",
              ARTIFACT="unused.ptz")  # so that EVAL_ONLY=1 is a valid change too
LOOPED = dict(COMMON, NUM_LOOPS="1", LOOP_START="1", LOOP_END="2", LOOP_MODE="layer", PARALLEL_RESIDUAL_START="-1",
              PARALLEL_RESIDUAL_GATE="0", PARALLEL_LANES_START="3")
ROUTED = dict(COMMON, ATTN_RES="1", ATTN_RES_BLOCKS="2", ATTN_RES_MIX="0.4", ATTN_RES_TEMP="0.9", DOC_ISOLATION="1",
              GATED_ATTN="sparse", GATE_WINDOW="6", SPARSE_GATE_SCALE="0.7", SMEAR_MODE="window")
CONFIGURED = dict(PRESET="baseline", UNET_SKIPS="0", ATTN_RES_BLOCKS="4")
ALTERNATIVES = {"ve_layers": ["2", "4"], "gated_attn": ["0", "headwise"]}


def perturbations(f, value) -> list:
    """Other values to try for one knob, nearest first."""
    if f.name in ALTERNATIVES:
        return [v for v in ALTERNATIVES[f.name] if v != value]
    if f.metadata["choices"]:
        return [c for c in f.metadata["choices"] if c != value]
    if f.type is bool:
        return [not value]
    if f.type is int:
        return [value + 1, value - 1, value * 2, value + 2]
    if f.type is float:
        hi = f.metadata["hi"]
        return [min(value * 1.5 + 0.1, hi) if hi is not None else value * 1.5 + 0.1, value / 2]
    return []


def logits(model: GPT, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's logits in every state of its kept switches (e.g. recurrence off and on)."""
    out = []
    for on in (False, True):
        for s in run_switches(model.args):
            if s.kept_after_training:
                s.set(model, on)
        with torch.no_grad():
            out.append(model.forward_logits(x))
    return out


def changes_the_model(base: Hyperparameters, other: Hyperparameters, state: dict, x: torch.Tensor) -> bool:
    """Another model, or another forward of the same weights."""
    a, b = GPT(base), GPT(other)
    a.load_state_dict(state)
    try:
        b.load_state_dict(state)
    except RuntimeError:
        return True
    return any(not torch.equal(u, v) for u, v in zip(logits(a, x), logits(b, x)))


def shaping_knobs(env: dict) -> tuple[set, set]:
    """(knobs whose change alone, from this configuration, changes the model; knobs with no valid change)."""
    base = Hyperparameters.from_env(env)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.3 for k, v in GPT(base).state_dict().items()}
    x = torch.randint(2, 64, (2, 24))
    x[:, 0] = x[:, 11] = 1  # two documents
    shaping, untested = set(), set()
    for f in Hyperparameters.knobs():
        for value in perturbations(f, getattr(base, f.name)):
            try:
                other = base.replace("test", **{f.name: value})
            except ConfigError:
                continue
            if changes_the_model(base, other, state, x):
                shaping.add(f.name)
            break
        else:
            if f.metadata["shapes_model"] or f.type in (bool, int, float):
                untested.add(f.name)
    return shaping, untested


def test_every_model_shaping_knob_is_an_architecture_field():
    """Each knob, changed alone from a configuration with every feature on: it is declared with
    arch() exactly when the same weights then fail to load or give other logits."""
    (looped, untested_looped), (routed, untested_routed) = shaping_knobs(LOOPED), shaping_knobs(ROUTED)
    assert not untested_looped & untested_routed, "no valid change for these knobs"
    assert looped | routed == set(Hyperparameters.architecture_fields())


def test_every_architecture_knob_is_restored_by_one_of_the_tests_below():
    """Each knob differs from CONFIGURED in LOOPED or ROUTED, so its restoration is checked."""
    configured = Hyperparameters.from_env(CONFIGURED)
    looped, routed = Hyperparameters.from_env(LOOPED), Hyperparameters.from_env(ROUTED)
    same = [n for n in Hyperparameters.architecture_fields()
            if getattr(configured, n) == getattr(looped, n) == getattr(routed, n)]
    assert not same


@pytest.mark.parametrize("env", [LOOPED, ROUTED], ids=["looped", "routed"])
def test_eval_only_rebuilds_the_artifacts_model(tmp_path, env):
    """An artifact written with the architecture knobs away from the configured values (and
    recurrence on) gives back the same model: knobs, switch state and logits."""
    arch = Hyperparameters.from_env(env)
    configured = Hyperparameters.from_env(CONFIGURED)
    torch.manual_seed(0)
    model = GPT(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    switches = run_switches(arch)
    for switch in switches:
        switch.set(model, True)
    qstate = quantize_state_dict(model.state_dict(), arch)
    path = tmp_path / "model.ptz"
    path.write_bytes(pack_artifact(qstate, artifact_meta(arch, switches), "zlib", 9))
    seen = []
    rebuilt = model_from_artifact(str(path), Context(configured, CPU_RUNTIME_FOR_TESTS, log=seen.append))
    assert all(getattr(rebuilt.args, n) == getattr(arch, n) for n in Hyperparameters.architecture_fields())
    assert rebuilt.looping == bool(arch.num_loops) and "using the artifact's" in seen[0]
    model.load_state_dict(dequantize_state_dict(qstate))
    x = torch.randint(2, 64, (2, 24))
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_logits(x), model.forward_logits(x))
