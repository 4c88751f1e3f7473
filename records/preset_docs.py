"""Write the generated parts of the records READMEs from train_gpt.PRESETS, so they cannot drift
from what the script runs: the feature table in records/README.md and the settings table in each
preset's records/<preset>/README.md (between `<!-- generated:... -->` markers).

    python records/preset_docs.py --write     # after changing a preset
    python records/preset_docs.py             # check only: exit 1 when a README is stale
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from train_gpt import PRESETS, Hyperparameters, atomic_write_text  # noqa: E402

COLUMNS = ("pr2005", "pr1658", "pr1232", "pr1696", "pr754", "pr1855", "pr2135", "baseline")


def on(flag, text="yes"):
    return text if flag else "-"


def loops(v):
    if not v.num_loops:
        return "-"
    form = "span" if v.loop_mode == "span" else "each layer, gated"
    return f"{v.loop_start}-{v.loop_end} x{1 + v.num_loops} ({form}) from {v.enable_looping_at:g}"


def warmdown(v):
    if v.warmdown_frac:
        return f"last {v.warmdown_frac:g} of the budget"
    return f"last {v.warmdown_iters} steps" if v.warmdown_iters else "-"


CLIPS = {"quantile": "quantile", "rowmax": "row max", "search": "search/row", "search_tensor": "search/tensor",
         "sdclip": "SDClip"}


def clip(rule, k):
    return CLIPS[rule] + (f" {k:g}" if rule == "sdclip" else "")


def quant(v):
    matrices = f"int{v.matrix_bits} {clip(v.matrix_clip, v.matrix_clip_sigmas)}"
    if v.matrix_clip == "sdclip" and (v.mlp_clip_sigmas or v.attn_clip_sigmas):
        k = v.matrix_clip_sigmas
        matrices = f"int{v.matrix_bits} SDClip MLP {v.mlp_clip_sigmas or k:g}, attn {v.attn_clip_sigmas or k:g}"
    embed = "bf16" if v.embed_bits == 16 else f"int{v.embed_bits} {clip(v.embed_clip, v.embed_clip_sigmas)}"
    gptq = "" if not v.gptq else (" + GPTQ" if v.gptq_embed else " + GPTQ (matrices)")
    floor = ", floor 1/qmax" if v.quant_scale_floor else ""
    return f"{matrices} / emb {embed}{floor}{gptq}"


def ttt(v):
    if not v.ttt_enabled:
        return "-"
    if v.ttt_mode == "doc_lora":
        return (f"per-document LoRA rank {v.ttt_lora_rank} ({v.ttt_lora_targets}), lr {v.ttt_lora_lr:g}, "
                f"wd {v.ttt_lora_wd:g}, chunks of {v.ttt_doc_chunk}; {v.ttt_phases} SGD phase(s) over "
                f"{v.ttt_phase_docs} documents")
    freeze = f", freeze {v.ttt_freeze_blocks}" if v.ttt_freeze_blocks else ""
    freeze += " (scales only)" if v.ttt_freeze_blocks and not v.ttt_freeze_matrices else ""
    warm = f", warm-up {v.ttt_warmup_frac:g}" if v.ttt_warmup_frac else ""
    return f"{v.ttt_epochs} ep, lr {v.ttt_lr:g}{warm}, chunk {v.ttt_chunk_tokens}{freeze}"


# (area, feature, cell from the effective Hyperparameters)
FEATURES = [
    ("data", "tokenizer", lambda v: f"sp{v.vocab_size}"),
    ("data", "training loader", lambda v: v.train_loader),
    ("data", "documents isolated (BOS)", lambda v: on(v.doc_isolation)),
    ("model", "layers x width, heads/kv", lambda v: f"{v.num_layers}x{v.model_dim}, {v.num_heads}/{v.num_kv_heads}"),
    ("model", "MLP", lambda v: f"{v.mlp_mult}x {v.mlp_act}"),
    ("model", "partial RoPE, base", lambda v: (f"{v.rope_dims}/{v.model_dim // v.num_heads}" if v.rope_dims else "all")
     + f", {v.rope_base:.6g}"),
    ("model", "LN scale 1/sqrt(i+1)", lambda v: on(v.ln_scale)),
    ("model", "QK gain init", lambda v: f"{v.qk_gain_init:g}"),
    ("model", "XSA", lambda v: "all" if v.xsa_last_n >= v.num_layers else (f"last {v.xsa_last_n}" if v.xsa_last_n else "-")),
    ("model", "gated attention", lambda v: {"0": "-", "1": "from input", "headwise": "headwise", "sparse": "sparse"}[v.gated_attn]),
    ("model", "value residual", lambda v: on(v.value_residual)),
    ("model", "value embeddings", lambda v: f"{v.ve_dim} on {v.ve_layers}" if v.ve_enabled else "-"),
    ("model", "SmearGate", lambda v: on(v.smear_gate, v.smear_mode)),
    ("model", "BigramHash", lambda v: f"{v.bigram_vocab_size}x{v.bigram_dim}" if v.bigram_vocab_size else "-"),
    ("model", "U-Net skips", lambda v: ("gated" if v.skip_gates else "yes") if v.unet_skips else "-"),
    ("model", "depth recurrence", loops),
    ("model", "parallel residuals", lambda v: (f"from {v.parallel_residual_start}" + (", gated" if v.parallel_residual_gate
                                                                                       else ""))
     if v.parallel_residual_start >= 0 else "-"),
    ("model", "two-lane decoder", lambda v: f"from {v.parallel_lanes_start}" if v.parallel_lanes_start >= 0 else "-"),
    ("model", "block attention residuals", lambda v: on(v.attn_res, f"{v.attn_res_blocks} blocks, "
                                                             f"{v.attn_res_mix:g}, {v.attn_res_temp:g}")),
    ("model", "OrthoInit", lambda v: on(v.ortho_init)),
    ("training", "Muon lr / wd", lambda v: f"{v.matrix_lr:g} / {v.muon_wd:g}"),
    ("training", "Muon normalisation", lambda v: "rows (MuonEq-R)" if v.muon_row_normalize
     else ("gradient" if v.muon_grad_normalize else "-")),
    ("training", "Newton-Schulz", lambda v: f"{v.muon_backend_steps} steps, " + ("Polar Express" if v.muon_polar
                                                                                 else "fixed quintic")),
    ("training", "Parallel Muon (banks)", lambda v: on(v.parallel_muon)),
    ("training", "momentum", lambda v: f"{v.muon_momentum_warmup_start:g}->{v.muon_momentum:g} / {v.muon_momentum_warmup_steps}"),
    ("training", "AdamW wd (scalars / emb)", lambda v: f"{v.adam_wd:g} / {v.embed_wd:g}"),
    ("training", "gradient clip", lambda v: f"{v.grad_clip_norm:g}" + (" per share" if v.grad_clip_scope == "share" else "")
     if v.grad_clip_norm else "-"),
    ("training", "warm-down", lambda v: warmdown(v) + (f", floor {v.min_lr:g}" if v.min_lr else "")),
    ("training", "time cap / steps", lambda v: f"{v.max_wallclock_seconds:g} s" if v.max_wallclock_seconds else f"{v.iterations} steps"),
    ("training", "EMA", lambda v: f"{v.ema_decay:g}" if v.ema_decay else "-"),
    ("training", "SWA", lambda v: f"every {v.swa_every} below {v.swa_start_scale:g}"
     + (", mean with EMA" if v.ema_decay else "") if v.swa_every else "-"),
    ("training", "late QAT", lambda v: f"below {v.late_qat_threshold:g}" if v.late_qat_threshold else "-"),
    ("artifact", "quantisation", quant),
    ("artifact", "LQER", lambda v: f"top {v.lqer_top_k}, rank {v.lqer_rank}" if v.lqer_top_k else "-"),
    ("artifact", "integers grouped by role", lambda v: on(v.pack_groups, "yes" + (
        f", {len(list(filter(None, v.pack_sorted_roles.split(','))))} row-sorted" if v.pack_sorted_roles else ""))),
    ("artifact", "compressor", lambda v: v.compressor + (f"-{v.compress_level}" if v.compress_level >= 0 else "")
     + (" + shuffle" if v.byte_shuffle else "")),
    ("artifact", "control tensors", lambda v: "fp32" if v.control_fp32 else "fp16"),
    ("artifact", "self-extracting code", lambda v: on(v.self_extract)),
    ("evaluation", "sliding window", lambda v: f"stride {v.eval_stride}" if v.eval_stride else "-"),
    ("evaluation", "window", lambda v: str(v.eval_seq_len)),
    ("evaluation", "score-first TTT", ttt),
    ("evaluation", "n-gram tilt", lambda v: f"order {v.ngram_order}, share {v.ngram_threshold:g}, boost {v.ngram_boost:g}"
     if v.ttt_enabled and v.ttt_mode == "doc_lora" and v.ngram_tilt else "-"),
]


def effective(name: str) -> Hyperparameters:
    return Hyperparameters.from_env({"PRESET": name})


def feature_table() -> str:
    values = {name: effective(name) for name in COLUMNS}
    rows = ["| area | feature | " + " | ".join(f"`{c}`" for c in COLUMNS) + " |",
            "|---|---|" + "---|" * len(COLUMNS)]
    for area, label, cell in FEATURES:
        rows.append(f"| {area} | {label} | " + " | ".join(cell(values[c]) for c in COLUMNS) + " |")
    return "\n".join(rows)


def settings_table(name: str) -> str:
    defaults = {f.name: f.default for f in Hyperparameters.knobs()}
    rows = ["| variable | value | script default |", "|---|---|---|"]
    for key, value in sorted(PRESETS[name].items()):
        shown = "same" if defaults[key] == value else f"`{defaults[key]!r}`"
        rows.append(f"| `{key.upper()}` | `{value!r}` | {shown} |")
    return "\n".join(rows)


def replace_block(text: str, tag: str, body: str, path: Path) -> str:
    begin, end = f"<!-- generated:{tag} -->", f"<!-- /generated:{tag} -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"error: {path} lacks the markers {begin} ... {end}")
    return text[:i + len(begin)] + "\n" + body + "\n" + text[j:]


def generated() -> dict[Path, str]:
    """Every README with its generated blocks brought up to date."""
    out = {}
    path = HERE / "README.md"
    out[path] = replace_block(path.read_text(encoding="utf-8"), "features", feature_table(), path)
    for name in COLUMNS:
        path = HERE / name / "README.md"
        out[path] = replace_block(path.read_text(encoding="utf-8"), "settings", settings_table(name), path)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stale = [p for p, text in generated().items() if p.read_text(encoding="utf-8") != text]
    if "--write" in argv:
        for p, text in generated().items():
            atomic_write_text(p, text)
        print(f"updated {len(stale)} file(s)")
        return 0
    for p in stale:
        print(f"stale: {p.relative_to(HERE.parent)} (run python records/preset_docs.py --write)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
