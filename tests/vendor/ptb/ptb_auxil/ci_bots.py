"""The bot the vendored tests run as (chatstate's stand-in for PTB's ``tests/auxil/ci_bots.py``).

PTB's version picks one of its real CI bots (tokens included); these tests never
reach Telegram, so a made-up bot with the same keys serves.
"""

BOT_INFO = {
    "token": "123456789:CHATSTATE-TEST-TOKEN",
    "chat_id": "987654321",
    "super_group_id": "-1001000000000",
    "forum_group_id": "-1001000000001",
    "channel_id": "@chatstate_tests",
    "name": "chatstate PTB tests",
    "username": "@chatstate_ptb_tests_bot",
    "payment_provider_token": "1:TEST:none",
    "subscription_channel_id": -1001000000002,
}


class BotInfoProvider:
    def get_info(self) -> dict[str, object]:
        return dict(BOT_INFO)


BOT_INFO_PROVIDER = BotInfoProvider()
