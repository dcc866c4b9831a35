"""Parity against the HF reference (`glm4v parity`, `python -m glm4v_core.parity`).

    compare.py         stage comparison and the fp32 / bf16 tolerances
    reference.py       reading and checking a reference file, its cases and inputs
    exact_kernels.py   the switch to exact kernels (no TF32, no reduced-precision reductions)
    run.py             logit parity of every case, stage by stage; which parity a checkpoint gets
    multi_image.py     several images per prompt
    quantized.py       int8 / int4 checkpoints against their budgets
    grads.py           loss and every gradient
    report.py          the table, JSON, plot and HTML report
    cli.py             the command
    make_reference.py  record a reference with a checkpoint's own HF code (`glm4v make-reference`)
    preflight.py       its checks before anything runs: consent, auto_map, --out, memory
    make_reference_cli.py  the `glm4v make-reference` command
    capture.py         its hooks and the spill-to-disk writer
"""
