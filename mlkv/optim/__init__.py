"""Row-wise optimizers whose state is stored inside each table row."""

from .adagrad import Adagrad
from .adam import Adam
from .base import Optimizer
from .registry import OPTIMIZERS, optimizer_from_config
from .rowwise_adagrad import RowWiseAdagrad
from .sgd import SGD

__all__ = ["OPTIMIZERS", "SGD", "Adagrad", "Adam", "Optimizer", "RowWiseAdagrad", "optimizer_from_config"]
