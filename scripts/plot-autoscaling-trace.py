"""Plots the autoscaling trace CSV: load on top, instances and nodes below, on one time axis."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, out: str) -> None:
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    t = [float(r["seconds"]) for r in rows]
    col = lambda name: [float(r[name]) for r in rows]  # noqa: E731
    fig, (load, inst) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5), height_ratios=[1, 1.2])
    load.step(t, col("clients"), where="post", label="load clients", color="tab:gray")
    load.plot(t, col("requests_in_flight"), label="requests in flight (scraped)", color="tab:orange")
    load.set_ylabel("load")
    load.legend(loc="upper right")
    load.grid(alpha=0.3)
    inst.step(t, col("desired_instances"), where="post", label="autoscaler decision", color="tab:blue", linestyle="--")
    inst.step(t, col("ready_instances"), where="post", label="instances serving (Ready)", color="tab:green")
    inst.step(t, col("nodes"), where="post", label="GPU nodes", color="tab:red", alpha=0.7)
    inst.set_ylabel("count")
    inst.set_xlabel("seconds")
    inst.set_yticks(range(0, int(max(col("nodes") + col("desired_instances"))) + 2))
    inst.legend(loc="upper right")
    inst.grid(alpha=0.3)
    fig.suptitle("llama-operator autoscaling: steps of load, real servers behind kwok pods")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
