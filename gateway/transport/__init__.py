"""The gateway's MQTT transport: its own MQTT 3.1.1 codec (`codec`) and an asyncio client
on it (`client`). The only place in the gateway meant to speak MQTT bytes."""
