"""The asyncio body of the telebot twins; ``../_sync`` is generated from it."""
