# Data preparation: toy task splits, DAPO-Math-17k, benchmark files from the evaluation package.


localrules:
    dapo_math_17k,
    export_benchmark,


rule toy_data:
    output:
        train=f"{R}/data/toy/train.jsonl",
        val=f"{R}/data/toy/val.jsonl",
        test=f"{R}/data/toy/test.jsonl",
        meta=f"{R}/data/toy/meta.json",
    params:
        toy=PLAN.commands.command("toy"),
        outdir=lambda w, output: os.path.dirname(output.train),
        seed=PLAN.cfg["toy"]["data"]["seed"],
        args=PLAN.commands.toy_args("data"),
    log:
        f"{R}/logs/data/toy_data.log",
    threads: PLAN.commands.threads("toy_data")
    resources:
        **PLAN.commands.snakemake_resources("toy_data"),
    conda:
        PLAN.commands.env_file()
    shell:
        "{params.toy} data --out {params.outdir} --seed {params.seed} {params.args} > {log} 2>&1"


rule dapo_math_17k:
    output:
        train=f"{R}/data/dapo_math_17k/train.jsonl",
        stats=f"{R}/data/dapo_math_17k/train.stats.json",
    params:
        args=lambda w: format_dapo_args(PLAN.cfg["data"].get("dapo_math_17k", {})),
    log:
        f"{R}/logs/data/dapo_math_17k.log",
    threads: PLAN.commands.threads("dapo")
    resources:
        **PLAN.commands.snakemake_resources("dapo"),
    conda:
        PLAN.commands.env_file()
    shell:
        "python -m cppo.pipeline dapo --out {output.train} {params.args} > {log} 2>&1"


rule export_benchmark:
    output:
        f"{R}/data/benchmarks/{{bench}}.jsonl",
    wildcard_constraints:
        bench=alternatives(PLAN.matrix.registry_benchmarks),
    log:
        f"{R}/logs/data/benchmark_{{bench}}.log",
    conda:
        PLAN.commands.env_file()
    shell:
        "python -m cppo.pipeline export-benchmark --name {wildcards.bench} --out {output} > {log} 2>&1"
