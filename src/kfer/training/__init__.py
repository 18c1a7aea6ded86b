"""The network, the one fit → score → log step, the train stage, resume, devices and tuning."""
