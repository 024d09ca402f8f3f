# Markdown summary and the optional wandb publication (rule publish_wandb; in the default
# target only when publish.wandb.enabled is true).


localrules:
    summary,
    publish_wandb,


rule summary:
    input:
        manifest=f"{R}/manifest.json",
        tables=expand("{root}/tables/{name}.md", root=R, name=TABLE_NAMES),
        figures=expand("{root}/figures/{name}.png", root=R, name=FIGURE_NAMES),
    output:
        report(f"{R}/summary.md", caption="report/summary.rst", category="Summary"),
    params:
        tables=TABLE_NAMES,
        figures=FIGURE_NAMES,
    log:
        f"{R}/logs/summary.log",
    conda:
        PLAN.commands.env_file()
    shell:
        "python -m cppo.pipeline summary --manifest {input.manifest} --tables {params.tables}"
        " --figures {params.figures} --out {output} > {log} 2>&1"


rule publish_wandb:
    input:
        manifest=f"{R}/manifest.json",
        summary=f"{R}/summary.md",
    output:
        f"{R}/publish/wandb.json",
    params:
        args=lambda w: wandb_args(PLAN.cfg["publish"]["wandb"]),
    log:
        f"{R}/logs/publish_wandb.log",
    conda:
        PLAN.commands.env_file()
    shell:
        "python -m cppo.pipeline publish --manifest {input.manifest} {params.args} --out {output}"
        " > {log} 2>&1"
