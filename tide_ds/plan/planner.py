"""The plan of a run on a cluster: checks, the teacher under each placement, the student rank's budget.

:func:`make_plan` decides like the real loader (``tide_ds.teacher.placement.decide_placement``, the same
function ``teacher.placement=auto`` calls at load time) and adds up every rank's GPU and host memory;
:func:`format_plan` prints it as tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tide_ds.config import RunConfig
from tide_ds.plan import memory as mem
from tide_ds.plan.checks import RunFacts, validate_run
from tide_ds.plan.memory import GIB, Cluster, TeacherRow
from tide_ds.teacher.placement import decide_placement


@dataclass
class Plan:
    cfg: RunConfig
    cluster: Cluster
    facts: RunFacts
    zero_stage: int
    teacher_rows: list[TeacherRow] = field(default_factory=list)
    placement: str = ""
    placement_reason: str = ""
    gpu_parts: list[tuple[str, int, str]] = field(default_factory=list)  # (part, bytes per rank, how)
    host_parts: list[tuple[str, int, str]] = field(default_factory=list)  # (part, bytes per node, how)
    problems: list[str] = field(default_factory=list)

    @property
    def gpu_total(self) -> int:
        return sum(b for _, b, _ in self.gpu_parts)

    @property
    def host_total(self) -> int:
        return sum(b for _, b, _ in self.host_parts)

    @property
    def fits(self) -> bool:
        return not self.problems


def _engine_settings(engine: dict) -> tuple[int, bool]:
    zero = engine.get("zero_optimization", {})  # the engine JSON as the start checks read it
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") == "cpu"
    return int(zero.get("stage", 0)), offload


def make_plan(cfg: RunConfig, cluster: Cluster) -> Plan:
    """Check ``cfg`` (no weights read) and size it on ``cluster``; ``plan.problems`` says why it does not fit."""
    facts = validate_run(cfg, world_size=cluster.world_size, on_gpu=True)
    stage, offload = _engine_settings(facts.engine)
    plan = Plan(cfg=cfg, cluster=cluster, facts=facts, zero_stage=stage)
    s, micro, L = facts.student, facts.micro_batch_size, cfg.data.seq_len
    local = min(cluster.world_size, cluster.gpus_per_node)

    states_gpu, states_host = mem.student_model_states(
        stage=stage, params=s.params, largest_layer_params=s.largest_layer_params, cluster=cluster,
        offload_optimizer=offload)
    estimator = "estimate_zero3_model_states_mem_needs" if stage == 3 else "estimate_zero2_model_states_mem_needs"
    plan.gpu_parts += [
        (f"student model states (ZeRO-{stage})", states_gpu, f"DeepSpeed {estimator}"),
        ("student activations", mem.student_activation_bytes(s, micro_batch=micro, seq_len=L),
         f"{micro} x 2L={2 * L} tokens x {s.layers} layers x {mem.per_token_layer_elements(s)} bf16 (estimate)"),
        ("student loss working memory", mem.student_loss_bytes(s, micro_batch=micro, seq_len=L),
         "fp32 head grad V x D + fp32 x_t hidden grad + 2 logits tiles"),
    ]
    plan.host_parts.append(("student states on the host", states_host, f"DeepSpeed {estimator} (per node)"))

    t = facts.teacher
    if t is not None:
        spec = cfg.distill.objective
        passes = 2 if spec.comp_demo else 1  # CompDemo's passes run as one forward over a [2B, L_t] batch
        plan.teacher_rows = mem.teacher_rows(t.footprint, cluster=cluster,
                                             forwards_per_step=facts.gradient_accumulation_steps,
                                             load_concurrency=cfg.teacher.load_concurrency)
        host_share = max(0, cluster.host_bytes_per_node - states_host) // local
        try:
            decision = decide_placement(
                cfg.teacher.placement, param_bytes=t.footprint.param_bytes, world_size=cluster.world_size,
                free_bytes=cluster.gpu_bytes, largest_group_bytes=t.footprint.largest_unit_bytes,
                host_free_bytes=host_share, read_buffer_bytes=t.footprint.load_buffer_bytes, on_cpu=False)
        except ValueError as err:
            plan.problems.append(str(err))
            return plan
        plan.placement, plan.placement_reason = decision.kind, decision.reason
        row = next(r for r in plan.teacher_rows if r.kind == decision.kind)
        # the teacher's own tokens (pipeline A, aligned B) or the student's ids (the other modes)
        l_t = facts.data.teacher_seq_len if facts.data and facts.data.teacher_seq_len else L
        tokens = l_t if t.bidirectional else 2 * l_t
        itemsize = t.dtype.itemsize
        plan.gpu_parts += [
            (f"teacher ({decision.kind})", row.gpu_peak,
             "replica" if decision.kind == "replicate" else "partition + largest gathered unit"),
            ("teacher forward working memory",
             mem.teacher_forward_bytes(t.footprint, micro_batch=passes * micro, tokens=tokens, itemsize=itemsize),
             f"{passes * micro} x {tokens} tokens, no grad (estimate)"),
        ]
        if spec.pipeline is not None and spec.pipeline.value == "B":
            plan.gpu_parts.append((
                "teacher row logits (pipeline B)",
                mem.teacher_logit_bytes(micro_batch=micro, rows=L, vocab=cfg.distill.shared_vocab_size,
                                        comp_demo=spec.comp_demo),
                f"fp32 [{micro}, <= {L}, {cfg.distill.shared_vocab_size}]" + (" x 3 (CompDemo)" if spec.comp_demo else ""),
            ))
        plan.host_parts.append((f"teacher load ({decision.kind}), {local} ranks", row.host_load_node,
                                "one 64 MiB read buffer per rank reading at once (teacher.load_concurrency)"))
    if plan.gpu_total > cluster.gpu_bytes:
        parts = ", ".join(f"{name} {b / GIB:.2f}" for name, b, _ in plan.gpu_parts)
        plan.problems.append(
            f"a rank needs {plan.gpu_total / GIB:.2f} GiB of GPU memory but has {cluster.gpu_bytes / GIB:.2f} GiB "
            f"({parts} GiB); lower train.micro_batch_size (set train.global_batch_size to keep the global batch), "
            "use more GPUs or --teacher.placement=zero3"
        )
    if plan.host_total > cluster.host_bytes_per_node:
        plan.problems.append(
            f"a node needs {plan.host_total / GIB:.2f} GiB of host memory but has "
            f"{cluster.host_bytes_per_node / GIB:.2f} GiB; use fewer ranks per node or a ZeRO-3 teacher"
        )
    return plan


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def format_plan(plan: Plan, *, recipe: str = "") -> str:
    c, f = plan.cluster, plan.facts
    out = [
        f"tide-ds plan{' for ' + recipe if recipe else ''}: {c.world_size} rank(s) = {c.nodes} node(s) x "
        f"{min(c.world_size, c.gpus_per_node)}, {_gib(c.gpu_bytes)} GiB GPU memory per rank, "
        f"{_gib(c.host_bytes_per_node)} GiB host memory per node",
        f"batch: micro {f.micro_batch_size} x {c.world_size} ranks x accumulation {f.gradient_accumulation_steps} = "
        f"global {f.global_batch_size}; {f.max_steps} optimizer steps"
        + (f" ({plan.cfg.train.epochs:g} epochs of {f.data.train_rows} rows)" if plan.cfg.train.epochs and f.data else ""),
        "checks: passed (paths, key layouts and shapes, ids and vocabularies, dataset columns and lengths, batch)",
    ]
    out += [f"note: {n}" for n in f.notes]
    s = f.student
    out += ["", f"Student: {s.params:,} parameters, {s.layers} layers, hidden {s.hidden}, vocab {s.vocab}; "
            f"ZeRO-{plan.zero_stage}"]
    t = f.teacher
    if t is not None:
        fp = t.footprint
        out += ["", f"Teacher rank role: {t.family}, {fp.params:,} parameters = {_gib(fp.param_bytes)} GiB in "
                f"{str(t.dtype).replace('torch.', '')}; largest layer {fp.largest_layer_params:,} parameters = "
                f"{_gib(fp.largest_layer_bytes)} GiB; largest gathered unit {_gib(fp.largest_unit_bytes)} GiB; "
                f"mask id {t.mask_token_id}"]
        rows = [[r.kind, _gib(r.gpu_resident), _gib(r.gathered_unit), _gib(r.gpu_peak), _gib(r.host_load_rank),
                 _gib(r.host_load_node), _gib(r.allgather_per_step), _gib(r.host_to_device_per_step)]
                for r in plan.teacher_rows]
        out += _table(["placement", "GPU resident", "gathered unit", "GPU peak", "host load/rank", "host load/node",
                       "all-gather/step", "host->GPU/step"], rows)
        out.append("(GiB; one teacher forward per micro-step, CompDemo's two passes stacked on the batch axis; "
                   "per optimizer step = x gradient accumulation)")
        if plan.placement:
            out.append(f"auto -> {plan.placement}: {plan.placement_reason}" if plan.cfg.teacher.placement == "auto"
                       else f"placement {plan.placement}: {plan.placement_reason}")
    out += ["", "Training rank, GPU memory:"]
    out += _table(["part", "GiB", "how"], [[n, _gib(b), how] for n, b, how in plan.gpu_parts]
                  + [["total", _gib(plan.gpu_total), f"of {_gib(c.gpu_bytes)}"]])
    out += ["", "Node, host memory during start-up:"]
    out += _table(["part", "GiB", "how"], [[n, _gib(b), how] for n, b, how in plan.host_parts]
                  + [["total", _gib(plan.host_total), f"of {_gib(c.host_bytes_per_node)}"]])
    out.append("")
    out += ([f"FITS: {plan.placement or 'no teacher'}"] if plan.fits
            else [f"DOES NOT FIT: {p}" for p in plan.problems])
    return "\n".join(out)
