"""WARP's report: the paper's claim checked (merged policies on or above the init-to-runs line), the
released eta chosen, and the KL-reward table and Pareto plot (warp.py runs the stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..plots import pyplot, save_figure


def line_check(init: dict, runs: list[dict], point: dict) -> dict:
    """Is `point` on or above the line from the init's (KL, reward) to the runs' mean point?

    line(kl) = R_init + (R_runs - R_init) (kl - KL_init) / (KL_runs - KL_init); margin = reward - line(kl).
    `extrapolated`: the point's KL is beyond the runs' mean, where the line is extended past its end (a
    bounded reward cannot follow a straight line there).
    """
    kl_runs = sum(r["kl"] for r in runs) / len(runs)
    reward_runs = sum(r["reward"] for r in runs) / len(runs)
    out = {
        "kl": point["kl"],
        "reward": point["reward"],
        "reward_sem": point.get("reward_sem"),
        "runs_mean_kl": round(kl_runs, 6),
        "runs_mean_reward": round(reward_runs, 6),
    }
    if kl_runs - init["kl"] <= 1e-12:
        return {
            **out,
            "line_reward": None,
            "margin": None,
            "above_line": None,
            "note": (
                f"the runs' estimated KL from the init ({kl_runs:.3g}) is not above the init's ({init['kl']:.3g}): "
                "sampled KL estimates this near 0 are noise, so there is no line to compare with"
            ),
        }
    slope = (reward_runs - init["reward"]) / (kl_runs - init["kl"])
    line = init["reward"] + slope * (point["kl"] - init["kl"])
    return {
        **out,
        "line_reward": round(line, 6),
        "margin": round(point["reward"] - line, 6),
        "above_line": bool(point["reward"] >= line),
        "extrapolated": bool(point["kl"] > kl_runs),
    }


def choose_eta(liti_rows: list[dict], choose: str, eta: float, kl_budget: Optional[float]) -> tuple[float, str]:
    """The released eta and why. Ties in reward go to the smaller eta (closer to the init)."""
    if choose == "eta":
        return eta, "fixed by warp.eta"
    best = lambda rows: max(rows, key=lambda r: (r["reward"], -r["eta"]))["eta"]  # noqa: E731
    if choose == "max_reward":
        return best(liti_rows), "highest reward"
    within = [r for r in liti_rows if r["kl"] <= kl_budget]
    if not within:  # no eta meets the budget: the one closest to it, said plainly
        closest = min(liti_rows, key=lambda r: r["kl"])["eta"]
        return closest, f"no eta has KL <= {kl_budget}; took the lowest KL"
    return best(within), f"highest reward with KL <= {kl_budget}"


def results_markdown(rows: list[dict], check: dict, chosen: float, why: str) -> str:
    head = (
        "| model | eta | KL to init | ± | reward | ± | accuracy | finished | length | vs line |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    keys = ("eta", "kl", "kl_sem", "reward", "reward_sem", "accuracy", "finished", "length", "margin")
    body = "".join(f"| {r['name']} | " + " | ".join(fmt(r.get(k)) for k in keys) + " |\n" for r in rows)
    if check["above_line"] is None:
        verdict = check["note"]
    else:
        where = "on or above" if check["above_line"] else "BELOW"
        sem = check.get("reward_sem") or 0.0
        noise = (
            f" That is within two standard errors of its reward (±{sem:.3g}): not a resolved difference."
            if abs(check["margin"]) < 2 * sem
            else ""
        )
        if check["extrapolated"]:
            noise += " Its KL is beyond the runs' mean, so the line is extrapolated there."
        verdict = (
            f"The merged policy at eta = {check['eta']:g} has reward {check['reward']:.4g} at KL "
            f"{check['kl']:.4g}; the line from the init to the runs' mean point gives "
            f"{check['line_reward']:.4g} there: it lies {where} the line "
            f"(margin {check['margin']:+.4g}).{noise}"
        )
    return (
        f"# WARP: KL-reward table\n\n{head}{body}\n'vs line': reward minus the init-to-runs-mean line at the "
        f"row's KL (± columns: standard errors over samples).\n\n{verdict}\n\nReleased: eta = {chosen:g} "
        f"({why}).\n"
    )


def plot_pareto(rows: list[dict], out: Path, chosen: float) -> Path:
    """KL (x) against reward (y): the init, each run, the runs' mean line, and the LITI curve."""
    plt = pyplot()

    init = next(r for r in rows if r["kind"] == "init")
    runs = [r for r in rows if r["kind"] == "run"]
    liti = sorted((r for r in rows if r["kind"] == "liti"), key=lambda r: r["eta"])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    check = line_check(init, runs, init)
    if check["runs_mean_kl"] > init["kl"]:  # the reference line of `line_check`, drawn across every point
        slope = (check["runs_mean_reward"] - init["reward"]) / (check["runs_mean_kl"] - init["kl"])
        right = max(r["kl"] for r in rows)
        ax.plot(
            [init["kl"], right],
            [init["reward"], init["reward"] + slope * (right - init["kl"])],
            "k--",
            lw=1,
            label="line: init to runs' mean",
        )
    ax.scatter([r["kl"] for r in runs], [r["reward"] for r in runs], c="tab:blue", label="PPO runs", zorder=3)
    for r in runs:
        ax.annotate(r["name"], (r["kl"], r["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([r["kl"] for r in liti], [r["reward"] for r in liti], "o-", c="tab:red", label="LITI of SLERP", zorder=3)
    for r in liti:
        ax.annotate(
            f"η={r['eta']:g}" + (" *" if r["eta"] == chosen else ""),
            (r["kl"], r["reward"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=8,
        )
    ax.scatter([init["kl"]], [init["reward"]], c="k", marker="*", s=120, label="init", zorder=4)
    ax.set_xlabel("KL to init (nats per completion)")
    ax.set_ylabel("mean reward")
    ax.set_title("WARP: KL-reward (* = released)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)
