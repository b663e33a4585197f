"""pyTelegramBotAPI's state examples (GPL-2.0, tests only), run on chatstate's storages."""
