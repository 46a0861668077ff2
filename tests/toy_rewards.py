"""Toy rewards for the RL tests: rewards the tiny random model can learn within a few steps, so a test can require the reward to
rise (a random tiny model never solves a word problem, so the verifier's reward would stay 0 for it)."""


def even_token_share(problem: dict, sample: dict) -> float:
    """The share of the sample's tokens whose id is even: ~0.5 for a random model, 1.0 at best."""
    ids = sample["token_ids"]
    return sum(1 for t in ids if t % 2 == 0) / len(ids) if ids else 0.0


def repeat_share(problem: dict, sample: dict) -> float:
    """The share of the sample's tokens that repeat the token before them: ~0 for the random tiny model at T=1, but
    at a low temperature it repeats now and then, and a policy gradient teaches it to copy within a few steps."""
    ids = sample["token_ids"]
    return sum(1 for a, b in zip(ids[1:], ids[:-1]) if a == b) / (len(ids) - 1) if len(ids) > 1 else 0.0
