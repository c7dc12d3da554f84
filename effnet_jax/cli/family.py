"""The family table: `python -m effnet_jax.cli.family` prints each variant's resolution, parameters, GFLOPs."""

from __future__ import annotations

from effnet_jax.model import variants
from effnet_jax.model.network import count_flops, count_params, create_model, param_shapes


def family_table() -> list[dict]:
    rows = []
    for v in variants.VARIANTS:
        model = create_model(v)
        cfg = model.config
        rows.append({"variant": v, "resolution": cfg.resolution, "params": count_params(param_shapes(model)),
                     "gflops": count_flops(cfg) / 1e9, "stem": cfg.stem_channels, "head": cfg.head_channels,
                     "blocks": len(cfg.blocks), "dropout": cfg.dropout})
    return rows


def main() -> None:
    print(f"{'variant':<8}{'resolution':>11}{'params':>13}{'GFLOPs':>9}{'stem':>6}{'head':>6}{'blocks':>8}"
          f"{'dropout':>9}")
    for r in family_table():
        print(f"{r['variant']:<8}{r['resolution']:>11}{r['params']:>13,}{r['gflops']:>9.3f}{r['stem']:>6}"
              f"{r['head']:>6}{r['blocks']:>8}{r['dropout']:>9.1f}")


if __name__ == "__main__":
    main()
