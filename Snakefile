# Adversarial Alignment, regenerated: stimuli -> training -> attacks -> statistics -> figures.
# The default config is the embedded synthetic benchmark; run the paper with
#   snakemake --profile slurm --configfile config/paper.yaml
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/stimuli.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/attack.smk"
include: "workflow/rules/human_alignment.smk"
include: "workflow/rules/attention.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/figures.smk"


onstart:
    stop_if_no_cores()  # --cores 0 would wait forever holding the lock
    stop_if_data_missing()  # the paper's data, when a job about to run needs it
    start_job_server()  # local runs: torch and timm imported once for all jobs (advalign.jobserver)


onsuccess:
    stop_job_server()


onerror:
    stop_job_server()


rule all:
    default_target: True
    input:
        all_outputs(),
