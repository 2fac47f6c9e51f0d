"""cmgen.losses — the one contrastive loss module shared by every subsystem.

Imports nothing from the rest of the project except :mod:`cmgen.distributed`.
"""

from cmgen.losses._core import masked_logsumexp
from cmgen.losses.debiased import DCL, HCL
from cmgen.losses.infonce import InfoNCE
from cmgen.losses.ntxent import NTXent
from cmgen.losses.selfcon import SelfCon
from cmgen.losses.supcon import SupCon
from cmgen.losses.twoc import TwoC
from cmgen.losses.barlow import BarlowTwins
from cmgen.losses.byol import NegativeCosine
from cmgen.losses.mochi import MoCHi
from cmgen.losses.queue import MoCoQueue, momentum_update
from cmgen.losses.ranking import MaxMarginRanking
from cmgen.losses.word_region import WordRegion
