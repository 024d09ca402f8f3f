# Aggregation: the manifest of the run matrix, long-form CSVs (model, method, seed, benchmark,
# step, value, n_samples) and the rendered tables (Markdown, LaTeX, HTML).


localrules:
    manifest,


rule manifest:
    output:
        f"{R}/manifest.json",
    params:
        # the manifest itself, so that a config change that changes it reruns the job
        manifest=MANIFEST,
    log:
        f"{R}/logs/manifest.log",
    run:
        write_json(params.manifest, output[0])


rule aggregate:
    input:
        manifest=f"{R}/manifest.json",
        runs=all_done(),
        selections=all_selections(),
        summaries=all_eval_summaries(),
        benchmarks=benchmark_files(PLAN.matrix.used_benchmarks),
    output:
        expand("{root}/tables/{name}.csv", root=R, name=AGGREGATE_CSVS),
    params:
        outdir=lambda w, output: os.path.dirname(output[0]),
    log:
        f"{R}/logs/aggregate.log",
    conda:
        PLAN.commands.env_file()
    shell:
        "python -m cppo.pipeline aggregate --manifest {input.manifest} --out-dir {params.outdir}"
        " > {log} 2>&1"


rule render_table:
    input:
        manifest=f"{R}/manifest.json",
        table=f"{R}/tables/{{table}}.csv",
        status=f"{R}/tables/run_status.csv",
    output:
        md=f"{R}/tables/{{table}}.md",
        tex=f"{R}/tables/{{table}}.tex",
        html=report(
            f"{R}/tables/{{table}}.html",
            caption="report/table.rst",
            category="Tables",
            labels={"table": "{table}"},
        ),
    wildcard_constraints:
        table=alternatives(TABLE_NAMES),
    params:
        tables_dir=lambda w, input: os.path.dirname(input.table),
        caption=lambda w: TABLES[w.table].caption,  # for report/table.rst
    log:
        f"{R}/logs/tables/{{table}}.log",
    conda:
        PLAN.commands.env_file()
    shell:
        "python -m cppo.pipeline table --manifest {input.manifest} --tables-dir {params.tables_dir}"
        " --name {wildcards.table} > {log} 2>&1"
