# Post-hoc evaluation: the best in-loop validation checkpoint within [0, T_stop] and the final
# model of every run, through the evaluation package's CLI (one job per run; a checkpoint at
# the same step as another is evaluated once).


rule select_checkpoints:
    input:
        done=run_done,
    output:
        f"{R}/selection/{{model}}/{{method}}/seed{{seed}}.json",
    params:
        run_dir=lambda w, input: os.path.dirname(input.done),
        t_stop=lambda w: PLAN.resolver.t_stop_steps(w.model),
        initial=lambda w: initial_model_args(w.model),
    log:
        f"{R}/logs/select/{{model}}/{{method}}/seed{{seed}}.log",
    conda:
        PLAN.commands.env_file()
    shell:
        "python -m cppo.pipeline select --run-dir {params.run_dir} --t-stop-steps {params.t_stop}"
        " {params.initial} --out {output} > {log} 2>&1"


rule evaluate:
    input:
        selection=f"{R}/selection/{{model}}/{{method}}/seed{{seed}}.json",
        benchmarks=benchmark_files(PLAN.cfg["evaluation"]["benchmarks"]),
    output:
        expand(
            "{root}/eval/{{model}}/{{method}}/seed{{seed}}/{ckpt}/{bench}.summary.json",
            root=R,
            ckpt=PLAN.matrix.eval_checkpoints,
            bench=PLAN.cfg["evaluation"]["benchmarks"],
        ),
    params:
        evaluate=PLAN.commands.command("evaluate"),
        out_root=lambda w: f"{R}/eval/{w.model}/{w.method}/seed{w.seed}",
        ckpts=" ".join(PLAN.matrix.eval_checkpoints),
        args=lambda w: PLAN.commands.eval_args(w.model),
    log:
        f"{R}/logs/eval/{{model}}/{{method}}/seed{{seed}}.log",
    threads: lambda w: PLAN.commands.threads("evaluate", w.model)
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=res("evaluate", "gpu"),
    conda:
        lambda w: PLAN.commands.env_file(w.model)
    shell:
        "OMP_NUM_THREADS={threads} python -m cppo.pipeline evaluate-run"
        " --selection {input.selection} --checkpoints {params.ckpts} --out-root {params.out_root}"
        " -- {params.evaluate} {params.args} --no-progress > {log} 2>&1"
