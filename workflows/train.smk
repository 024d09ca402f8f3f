# Training: one job per {model, method, seed}. The job's declared output is only the trainer's
# DONE marker, so a failed or killed job leaves the run directory (checkpoints, metrics) in
# place and the next invocation resumes from it (cppo.pipeline.jobs.prepare_state_dir).


localrules:
    run_config,


rule run_config:
    output:
        f"{R}/configs/{{model}}/{{method}}/seed{{seed}}.yaml",
    params:
        # the run.yaml itself, so that a config change that changes it reruns the job
        text=lambda w: yaml_text(PLAN.resolver.run_config(w.model, w.method, w.seed)),
    log:
        f"{R}/logs/configs/{{model}}/{{method}}/seed{{seed}}.log",
    conda:
        PLAN.commands.env_file()
    # a shell job runs inside Snakemake's process; a `run:` job starts a new Snakemake (~9 s each)
    shell:
        "printf '%s' {params.text:q} > {output:q}"


rule train:
    input:
        cfg=f"{R}/configs/{{model}}/{{method}}/seed{{seed}}.yaml",
        data=PLAN.matrix.train_data,
        model=lambda w: PLAN.matrix.model_inputs(w.model),
        benchmarks=benchmark_files(PLAN.cfg["validation"]["benchmarks"]),
    output:
        f"{R}/runs/{{model}}/{{method}}/seed{{seed}}/DONE",
    params:
        state=lambda w, output: os.path.dirname(output[0]),
        trainer=lambda w: PLAN.commands.train_command(w.model),
        # CPU threads per trainer process (one process per GPU under accelerate); `threads` is
        # the job's (per node), as granted (capped by --cores on a local run)
        omp=lambda w, threads: max(1, threads // PLAN.commands.processes_per_node(w.model)),
    log:
        f"{R}/logs/train/{{model}}/{{method}}/seed{{seed}}.log",
    threads: lambda w: PLAN.commands.threads("train", w.model)
    # a run longer than its wall time takes several jobs, each resuming from the last
    # checkpoint: enough retries for the longest estimated run (None: the profile's --retries)
    retries: RESOURCES.train_retries()
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=res("train", "gpu"),
        # multi-node jobs only (None otherwise): see Plan.commands.snakemake_resources
        nodes=res("train", "nodes"),
        tasks_per_node=res("train", "tasks_per_node"),
        cpus_per_task=res("train", "cpus_per_task"),
        mpi=res("train", "mpi"),
    conda:
        lambda w: PLAN.commands.env_file(w.model)
    shell:
        "OMP_NUM_THREADS={params.omp} MKL_NUM_THREADS={params.omp}"
        " python -m cppo.pipeline train-job --run-config {input.cfg} --state-dir {params.state}"
        " -- {params.trainer} > {log} 2>&1"
