# Figures (PNG for the report, PDF for papers): Fig. 4, Fig. 8-11 diagnostics per model,
# Fig. 7, Fig. 2 and the Fig. 5/6 ablation figures named in the config.


rule figure:
    input:
        manifest=f"{R}/manifest.json",
        runs=all_done(),
    output:
        png=report(
            f"{R}/figures/{{figure}}.png",
            caption="report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
        pdf=f"{R}/figures/{{figure}}.pdf",
    wildcard_constraints:
        figure=alternatives(FIGURE_NAMES),
    params:
        prefix=lambda w, output: os.path.splitext(output.png)[0],
        caption=lambda w: FIGURES[w.figure].caption,  # for report/figure.rst
    log:
        f"{R}/logs/figures/{{figure}}.log",
    conda:
        PLAN.commands.env_file()
    shell:
        "MPLBACKEND=Agg python -m cppo.pipeline figure --manifest {input.manifest}"
        " --name {wildcards.figure} --out-prefix {params.prefix} > {log} 2>&1"
