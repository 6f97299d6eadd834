"""The gateway's MQTT transport: its own MQTT 3.1.1 codec (`codec`), an asyncio client on it
(`client`), the topic names (`topics`) and the broker's configuration and control
(`broker`). The only place in the gateway meant to speak MQTT bytes."""
