"""sdlm: optimize prompts of causal language models by gradient descent.

The prompt is a learnable distribution over the vocabulary at each position. Each step draws
hard tokens from it with the Straight-Through Gumbel-Softmax trick, feeds them through a frozen
model and scores the result, so the gradient reaches the prompt's logits.
"""

from sdlm.stgs import STGS, STGSOutput
from sdlm.stgs_diff_model import GenerateOutput, STGSDiffModel
from sdlm.stgs_diff_string import STGSDiffString

__all__ = ["STGS", "STGSOutput", "STGSDiffModel", "STGSDiffString", "GenerateOutput"]
