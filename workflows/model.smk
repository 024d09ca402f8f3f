# Models: toy tokenizer, tiny Qwen3 initialisations and SFT warm starts (toy scale), or a
# download of the pinned hub revision on the submit host (paper scale, optional).


localrules:
    hub_prefetch,


rule toy_tokenizer:
    input:
        train=f"{R}/data/toy/train.jsonl",
    output:
        directory(f"{R}/models/tokenizer"),
    params:
        toy=PLAN.commands.command("toy"),
        data=lambda w, input: os.path.dirname(input.train),
        args=PLAN.commands.toy_args("tokenizer"),
    log:
        f"{R}/logs/models/tokenizer.log",
    threads: PLAN.commands.threads("toy_model")
    resources:
        **PLAN.commands.snakemake_resources("toy_model"),
    conda:
        PLAN.commands.env_file()
    shell:
        "{params.toy} tokenizer --data {params.data} --out {output} {params.args} > {log} 2>&1"


rule toy_init_model:
    input:
        tokenizer=f"{R}/models/tokenizer",
    output:
        directory(f"{R}/models/init/{{init}}"),
    wildcard_constraints:
        init=alternatives(PLAN.matrix.init_models),
    params:
        toy=PLAN.commands.command("toy"),
        preset=lambda w: PLAN.matrix.init_models[w.init]["preset"],
        seed=lambda w: PLAN.matrix.init_models[w.init]["seed"],
        args=PLAN.commands.toy_args("model"),
    log:
        f"{R}/logs/models/init_{{init}}.log",
    threads: PLAN.commands.threads("toy_model")
    resources:
        **PLAN.commands.snakemake_resources("toy_model"),
    conda:
        PLAN.commands.env_file()
    shell:
        "{params.toy} model --preset {params.preset} --tokenizer {input.tokenizer}"
        " --out {output} --seed {params.seed} {params.args} > {log} 2>&1"


rule toy_warm_start:
    input:
        model=lambda w: PLAN.matrix.init_model_dir(
            PLAN.matrix.init_model_name(PLAN.matrix.warm_starts[w.start]["model"])
        ),
        train=f"{R}/data/toy/train.jsonl",
        val=f"{R}/data/toy/val.jsonl",
    output:
        directory(f"{R}/models/warm/{{start}}"),
    wildcard_constraints:
        start=alternatives(PLAN.matrix.warm_starts),
    params:
        toy=PLAN.commands.command("toy"),
        data=lambda w, input: os.path.dirname(input.train),
        flavour=lambda w: PLAN.matrix.warm_starts[w.start]["flavour"],
        seed=lambda w: PLAN.matrix.warm_starts[w.start]["seed"],
        args=PLAN.commands.toy_args("warm_start"),
    log:
        f"{R}/logs/models/warm_start_{{start}}.log",
    threads: PLAN.commands.threads("warm_start")
    resources:
        **PLAN.commands.snakemake_resources("warm_start"),
    conda:
        PLAN.commands.env_file()
    shell:
        "OMP_NUM_THREADS={threads} {params.toy} warm-start --model {input.model}"
        " --data {params.data} --flavour {params.flavour} --out {output} --seed {params.seed}"
        " {params.args} > {log} 2>&1"


rule hub_prefetch:
    output:
        f"{R}/models/{{model}}.hub.json",
    wildcard_constraints:
        model=alternatives(PLAN.matrix.hub_models),
    params:
        hub_id=lambda w: PLAN.cfg["models"][w.model]["hub"]["id"],
        revision=lambda w: PLAN.cfg["models"][w.model]["hub"]["revision"],
    log:
        f"{R}/logs/models/prefetch_{{model}}.log",
    conda:
        PLAN.commands.env_file()
    shell:
        "python -m cppo.pipeline prefetch --id {params.hub_id} --revision {params.revision}"
        " --out {output} > {log} 2>&1"
