"""The PPO maths of both scripts (each has its own copy, by the single-file design): GAE against an independent
per-episode computation, the losses on hand-worked numbers, and one update step against the loss written out here."""

import copy

import numpy as np
import pytest
import scipy.signal
import torch

import ppo_cartpole
import ppo_mario

SCRIPTS = [pytest.param(ppo_cartpole, id="cartpole"), pytest.param(ppo_mario, id="mario")]


# ----------------------------------------------------------------------------------------------------------- GAE

def discounted_cumsum(x, discount):
    """y[t] = sum_k discount^k x[t+k], by a linear filter run backwards."""
    return scipy.signal.lfilter([1], [1, -discount], x[::-1])[::-1]


def reference_gae(rewards, values, terminations, truncations, final_values, next_value, gamma, lam):
    """Per environment, per episode segment: TD errors with the right bootstrap, then a discounted sum over the segment."""
    num_steps, num_envs = rewards.shape
    advantages = np.zeros_like(rewards)
    for env in range(num_envs):
        segment_start = 0
        for t in range(num_steps):
            ended = terminations[t, env] or truncations[t, env]
            if not ended and t < num_steps - 1:
                continue
            segment = range(segment_start, t + 1)
            deltas = []
            for k in segment:
                if k < t:
                    next_v = values[k + 1, env]
                elif terminations[k, env]:
                    next_v = 0.0
                elif truncations[k, env]:
                    next_v = final_values[k, env]
                else:  # the rollout's last step, mid-episode
                    next_v = next_value[env]
                deltas.append(rewards[k, env] + gamma * next_v - values[k, env])
            advantages[segment_start:t + 1, env] = discounted_cumsum(np.array(deltas), gamma * lam)
            segment_start = t + 1
    return advantages


@pytest.mark.parametrize("script", SCRIPTS)
def test_gae_matches_an_independent_per_episode_computation(script):
    rng = np.random.default_rng(0)
    num_steps, num_envs, gamma, lam = 16, 4, 0.97, 0.9
    rewards = rng.normal(size=(num_steps, num_envs))
    values = rng.normal(size=(num_steps, num_envs))
    terminations = np.zeros((num_steps, num_envs))
    truncations = np.zeros((num_steps, num_envs))
    terminations[3, 0] = terminations[10, 0] = 1  # two episodes end mid-rollout in env 0
    truncations[5, 1] = 1                           # a time-limit truncation that must bootstrap
    terminations[7, 2] = truncations[7, 2] = 1      # both at once: termination wins, no bootstrap
    truncations[num_steps - 1, 3] = 1               # truncated on the rollout's last step
    final_values = np.where(truncations == 1, rng.normal(size=(num_steps, num_envs)), 0.0)
    next_value = rng.normal(size=num_envs)

    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    advantages, returns = script.compute_gae(t(rewards), t(values), t(terminations), t(truncations), t(final_values),
                                             t(next_value), gamma, lam)
    expected = reference_gae(rewards, values, terminations, truncations, final_values, next_value, gamma, lam)
    np.testing.assert_allclose(advantages.numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(returns.numpy(), expected + values, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("script", SCRIPTS)
def test_gae_truncation_bootstraps_and_termination_does_not(script):
    # One step, reward 1, V(s)=0, V(final)=10: truncation gives 1 + gamma*10, termination gives 1.
    ones, zeros = torch.ones(1, 1), torch.zeros(1, 1)
    final_values = torch.full((1, 1), 10.0)
    truncated, _ = script.compute_gae(ones, zeros, zeros, ones, final_values, torch.zeros(1), 0.9, 0.95)
    terminated, _ = script.compute_gae(ones, zeros, ones, zeros, final_values, torch.zeros(1), 0.9, 0.95)
    assert truncated.item() == pytest.approx(1 + 0.9 * 10)
    assert terminated.item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("script", SCRIPTS)
def test_policy_loss_on_hand_worked_numbers(script):
    # ratio = exp(new - old); eps = 0.2; per sample min(r A, clip(r) A):
    #   A= 2, r=1.5 -> min(3.0, 2.4)   =  2.4  (clipped: no gradient)
    #   A=-1, r=1.5 -> min(-1.5, -1.2) = -1.5  (unclipped side is lower: gradient flows)
    #   A= 1, r=0.5 -> min(0.5, 0.8)   =  0.5  (unclipped)
    #   A=-2, r=0.9 -> inside the range  = -1.8
    # loss = -(2.4 - 1.5 + 0.5 - 1.8) / 4 = 0.1
    advantages = torch.tensor([2.0, -1.0, 1.0, -2.0])
    old_logprob = torch.zeros(4)
    new_logprob = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.9])).requires_grad_()
    loss = script.policy_loss(new_logprob, old_logprob, advantages, clip_coef=0.2)
    assert loss.item() == pytest.approx(0.1, abs=1e-6)
    loss.backward()
    # d loss / d logprob = -A r / 4 where the unclipped term is the minimum, else 0.
    np.testing.assert_allclose(new_logprob.grad.numpy(), [0.0, 0.375, -0.125, 0.45], atol=1e-6)


@pytest.mark.parametrize("script", SCRIPTS)
def test_value_loss_on_hand_worked_numbers(script):
    new_values, old_values, returns = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.5]), torch.tensor([2.0, 2.0])
    # Unclipped: 0.5 * mean((1-2)^2, (3-2)^2) = 0.5
    assert script.value_loss(new_values, old_values, returns).item() == pytest.approx(0.5)
    # Clipped predictions: 0 + clip(1, -.2, .2) = 0.2 -> (0.2-2)^2 = 3.24; 2.5 + 0.2 = 2.7 -> 0.49.
    # Pessimistic max per sample: 3.24 and 1.0 -> 0.5 * mean = 1.06
    assert script.value_loss(new_values, old_values, returns, clip_coef=0.2).item() == pytest.approx(1.06)


@pytest.mark.parametrize("script", SCRIPTS)
def test_advantage_normalisation_on_hand_worked_numbers(script):
    # mean 2.5, sample std sqrt(5/3) = 1.2910: (A - 2.5) / 1.2910
    normalized = script.normalize_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(normalized.numpy(), [-1.161895, -0.387298, 0.387298, 1.161895], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------- update

def make_agent_and_batch(script, batch_size, seed=0):
    torch.manual_seed(seed)
    if script is ppo_mario:
        agent = ppo_mario.Agent(4, 5)
        obs = torch.randint(0, 256, (batch_size, 4, 84, 84), dtype=torch.uint8)
    else:
        agent = ppo_cartpole.Agent(4, 2)
        obs = torch.randn(batch_size, 4)
    with torch.no_grad():
        actions, logprobs, _, current_values = agent.get_action_and_value(obs)
    # The policy and values the rollout recorded differ from the current ones (as after an earlier epoch), so the
    # ratio, both clips and the value clip all take part: half the returns lie near the current values, where the
    # clipped value prediction (at most clip_coef from the recorded one) is the worse and wins the max.
    logprobs = logprobs + 0.3 * torch.randn(batch_size)
    values = current_values + 0.5 * torch.randn(batch_size)
    returns = torch.where(torch.arange(batch_size) % 2 == 0, current_values + 0.05 * torch.randn(batch_size),
                          values + torch.randn(batch_size))
    batch = {"obs": obs, "actions": actions, "logprobs": logprobs, "values": values,
             "advantages": 2.0 + torch.randn(batch_size), "returns": returns}
    return agent, batch


def reference_loss(agent, batch, clip_coef, ent_coef, vf_coef):
    """The PPO loss of one minibatch written out from the paper's equations, independently of the scripts' functions."""
    _, new_logprob, entropy, new_value = agent.get_action_and_value(batch["obs"], batch["actions"])
    a = batch["advantages"]
    a = (a - a.mean()) / (a.std() + 1e-8)
    ratio = torch.exp(new_logprob - batch["logprobs"])
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef) * a)
    v_clipped = batch["values"] + torch.clamp(new_value - batch["values"], -clip_coef, clip_coef)
    v_loss = 0.5 * torch.maximum((new_value - batch["returns"]) ** 2, (v_clipped - batch["returns"]) ** 2).mean()
    return -surrogate.mean() - ent_coef * entropy.mean() + vf_coef * v_loss


@pytest.mark.parametrize("script", SCRIPTS)
def test_one_update_step_descends_the_written_out_loss(script):
    # One epoch of one minibatch with plain SGD: the update must move every weight by exactly -lr * grad of the loss
    # above (after the global gradient-norm clip), so a wrong sign, coefficient, clip or normalisation shows.
    agent, batch = make_agent_and_batch(script, 16)
    args = script.Args(num_minibatches=1, update_epochs=1, clip_coef=0.2, ent_coef=0.05, vf_coef=0.7,
                       max_grad_norm=0.5, norm_adv=True, clip_vloss=True)
    reference = copy.deepcopy(agent)
    lr = 0.1
    loss = reference_loss(reference, batch, 0.2, 0.05, 0.7)
    loss.backward()
    grads = [p.grad for p in reference.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = min(1.0, 0.5 / (norm.item() + 1e-6))
    assert scale < 1.0  # the clip is exercised

    stats = script.ppo_update(agent, torch.optim.SGD(agent.parameters(), lr=lr), batch, args)
    for (name, p), p0, g in zip(agent.named_parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p, p0 - lr * scale * g, rtol=1e-4, atol=1e-6, msg=name)
    assert stats["policy_loss"] + 0.7 * stats["value_loss"] - 0.05 * stats["entropy"] == pytest.approx(loss.item(), rel=1e-4)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_update_raises_the_probability_of_better_than_average_actions(script):
    agent, batch = make_agent_and_batch(script, 64, seed=1)
    with torch.no_grad():
        _, batch["logprobs"], _, batch["values"] = agent.get_action_and_value(batch["obs"], batch["actions"])
    batch["advantages"] = torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0)
    args = script.Args(num_minibatches=4, update_epochs=4, learning_rate=1e-3)
    script.ppo_update(agent, torch.optim.Adam(agent.parameters(), lr=1e-3), batch, args)
    with torch.no_grad():
        _, new_logprobs, _, _ = agent.get_action_and_value(batch["obs"], batch["actions"])
    change = new_logprobs - batch["logprobs"]
    assert change[0::2].mean() > 0 > change[1::2].mean()
    # The clip keeps the new policy near the old one: no ratio far outside 1 +- clip_coef after 4 epochs.
    assert change.exp().max() < 1 + 3 * args.clip_coef and change.exp().min() > 1 - 3 * args.clip_coef
