"""Appendix D, bells and whistles for the training loop: warmup, cosine decay, gradient clipping."""

from ..train import calc_loss_batch, evaluate_model, generate_and_print_sample, train_model

__all__ = ["find_highest_gradient", "train_model", "calc_loss_batch", "evaluate_model", "generate_and_print_sample"]


def find_highest_gradient(model):
    """The largest gradient entry over all parameters that have one (a 0-d tensor), None when none has."""
    max_grad = None
    for param in model.parameters():
        if param.grad is not None:
            largest = param.grad.detach().max()
            if max_grad is None or largest > max_grad:
                max_grad = largest
    return max_grad
