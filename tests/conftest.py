import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def flow_model():
    from progrpo_ref.digits.model import load_flow_model

    return load_flow_model()


@pytest.fixture(scope="session")
def margin_reward():
    from progrpo_ref.digits.rewards import get_reward

    return get_reward("margin")


@pytest.fixture(scope="session")
def sde():
    from progrpo_ref.algorithm.samplers import FlowSDE

    return FlowSDE(10, 0.7)
