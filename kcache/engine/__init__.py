"""The serving engine: sequences, block manager, scheduler, model runner, sampler, scoring, rank start-up and TP workers."""
