"""The second synthetic setting: another world (seed 7), fewer rare codes per family and a lighter
tail, more multi-visit patients, 1,200 training-cohort patients; held-out 6,000 of the same world."""
from leader_edge.data.dataset import write_dataset
from leader_edge.data.synth import SynthConfig, cohort_dataset, generate_cohort

for name, n in (("synth7", 1200), ("held7", 6000)):
    cfg = SynthConfig(patients=n, seed=7, tail_codes=20, tail_mass=0.4, single_visit_share=0.6)
    write_dataset(cohort_dataset(generate_cohort(cfg)), name, source="synth", options={"seed": 7, "patients": n, "tail_codes": 20, "tail_mass": 0.4, "single_visit_share": 0.6})
