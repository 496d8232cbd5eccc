"""Send a message and read the dialog back with the typed client; run it after `make run`."""

import os

from client import ChannelSecurity, DialogClient, DialogShardError, Order

# The token provider is asked before every call, so a refreshed token is picked up at once.
with DialogClient.connect(
    "127.0.0.1:50051", ChannelSecurity(plaintext=True), token=lambda: os.environ["TOKEN"], timeout=5.0
) as dialogs:
    sent = dialogs.send_message(1, 2, "hello from Python")  # retried safely: one request_id throughout
    print("stored", sent.message.message_id, "replayed:", sent.replayed)

    for message in dialogs.iter_dialog(1, 2, page_size=50, order=Order.OLDEST_FIRST):
        print(message.create_time.isoformat(), message.from_user_id, "->", message.to_user_id, message.text)

    try:
        dialogs.send_message(1, 2, "   ")
    except DialogShardError as error:
        print("refused:", error.code.name, [v.field for v in error.field_violations])
