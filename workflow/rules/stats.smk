# Per-model statistics, the tests of docs/methods.md §5, the claims table and Tables S1-S2.
# Every rule here is a localrule: seconds of pandas/scipy on the submit host, never
# worth a SLURM queue wait.


rule model_table:
    input:
        **({"reliance": "results/stats/cue_reliance.csv"} if SYNTHETIC else {}),
        attacks=attack_outputs("parquet"),
        metrics=model_metrics(),
        # every model's human feature alignment (rule human_alignment, Table S2's measure)
        human=[f"results/human_alignment/{m}.csv" for m in MODELS],
        # attention under attack of every model the main attack runs on (rule attention)
        attention=PLAN.attention_outputs(),
        # synthetic data: the measured cue reliance of every model (rule cue_reliance)
    output:
        report(
            "results/stats/model_attack_table.csv",
            caption="../report/model_table.rst",
            category="Tables",
        ),
    log:
        "logs/stats/model_table.log",
    localrule: True
    conda:
        "../../envs/plotting.yaml"
    params:
        code=code_version("model_table.py"),
        zoo=[model_row(m) for m in MODELS],
    script:
        "../scripts/model_table.py"


rule statistical_tests:
    input:
        table="results/stats/model_attack_table.csv",
        attacks=attack_outputs("parquet"),
    output:
        "results/stats/tests.json",
    log:
        "logs/stats/statistical_tests.log",
    localrule: True
    conda:
        "../../envs/plotting.yaml"
    params:
        code=code_version("statistical_tests.py"),
    script:
        "../scripts/statistical_tests.py"


rule claims:
    input:
        tests="results/stats/tests.json",
        table="results/stats/model_attack_table.csv",
    output:
        csv=report(
            "results/tables/claims.csv",
            caption="../report/claims.rst",
            category="Tables",
        ),
        md="results/tables/claims.md",
    log:
        "logs/stats/claims.log",
    localrule: True
    conda:
        "../../envs/plotting.yaml"
    params:
        code=code_version("claims.py"),
    script:
        "../scripts/claims.py"


rule table_s1:
    input:
        table="results/stats/model_attack_table.csv",
    output:
        csv=report(
            "results/tables/table_s1.csv",
            caption="../report/table_s1.rst",
            category="Tables",
        ),
        md="results/tables/table_s1.md",
    log:
        "logs/stats/table_s1.log",
    localrule: True
    conda:
        "../../envs/plotting.yaml"
    params:
        code=code_version("table_s1.py"),
    script:
        "../scripts/table_s1.py"


rule table_s2:
    input:
        table="results/stats/model_attack_table.csv",
    output:
        csv=report(
            "results/tables/table_s2.csv",
            caption="../report/table_s2.rst",
            category="Tables",
        ),
        md="results/tables/table_s2.md",
    log:
        "logs/stats/table_s2.log",
    localrule: True
    conda:
        "../../envs/plotting.yaml"
    params:
        code=code_version("table_s2.py"),
        released=config["zoo"].get("harmonized") == "released" and not SYNTHETIC,
    script:
        "../scripts/table_s2.py"


if SYNTHETIC:

    rule cue_reliance:
        # The known answer of the synthetic world: which cue each model's decisions follow
        # (cue-conflict set) and what occluding either cue costs (advalign.reliance).
        input:
            weights=[model_weights(m) for m in MODELS],
            conflict="results/data/conflict.npz",
            stimuli="results/data/stimuli.npz",
        output:
            report(
                "results/stats/cue_reliance.csv",
                caption="../report/cue_reliance.rst",
                category="Tables",
            ),
        log:
            "logs/stats/cue_reliance.log",
        # Seconds of CPU on the synthetic benchmark (the only data with a conflict set).
        localrule: True
        conda:
            "../../envs/torch.yaml"
        params:
            code=code_version("cue_reliance.py"),
            zoo=[model_row(m) for m in MODELS],
            device=config["device"],
            cpu_kernels=config["cpu_kernels"],
        script:
            "../scripts/cue_reliance.py"
