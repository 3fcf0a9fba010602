"""WebShop (Yao et al. 2022): an offline generated catalog with FTS5 search, or the original server."""

from leap_dspy.envs.webshop.catalog import Catalog
from leap_dspy.envs.webshop.env import DEFAULT_NUM_PRODUCTS, WebShop
from leap_dspy.envs.webshop.http import WebShopServerUnavailable
from leap_dspy.envs.webshop.reward import get_reward

__all__ = ["DEFAULT_NUM_PRODUCTS", "Catalog", "WebShop", "WebShopServerUnavailable", "get_reward"]
