"""transpeft: train PEFT adapters with Trans-PEFT's FFN regularisers, and carry a fleet of them over to
each new version of its base model, judged by a gate and tracked per base version."""
