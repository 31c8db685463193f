"""Training the policy: the packed PPO-style update (`policy`) and the supervised warm-up (`sft`)."""
