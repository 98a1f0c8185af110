"""DCAF's shopping cart, as DCAF users write it: sync tools that read and change the session.

Each tool takes a ``session`` parameter and calls ``session.get/set/delete`` without ``await``.
Those changes are stored when the tool returns, together with its result, so the cart is
there in the next turn, after a restart too. checkout needs the user's approval.

Configure a model as in session_usage.py, then run: python examples/shopping_cart.py
It plays the four turns of DCAF's session-lifecycle table against sessions.db in this folder.
"""

from __future__ import annotations

import asyncio
from typing import Any

from conversa import Session, create_session, tool


@tool(description="Add item to shopping cart")
def add_to_cart(item: str, quantity: int, session: Session) -> str:
    """Add an item to the user's cart."""
    cart = session.get("cart", [])
    cart.append({"item": item, "quantity": quantity})
    session.set("cart", cart)
    total_items = sum(i["quantity"] for i in cart)
    return f"Added {quantity}x {item}. Cart now has {total_items} items."


@tool(description="View shopping cart contents")
def view_cart(session: Session) -> str:
    """Show what's in the cart."""
    cart = session.get("cart", [])
    if not cart:
        return "Your cart is empty."
    lines = ["Your cart contains:"]
    lines += [f"  - {i['quantity']}x {i['item']}" for i in cart]
    lines.append(f"Total: {sum(i['quantity'] for i in cart)} items")
    return "\n".join(lines)


@tool(description="Clear the shopping cart")
def clear_cart(session: Session) -> str:
    """Remove all items from the cart."""
    session.delete("cart")
    return "Cart cleared."


@tool(requires_approval=True, description="Checkout and complete purchase")
def checkout(session: Session) -> str:
    """Complete the purchase."""
    cart = session.get("cart", [])
    if not cart:
        return "Cannot checkout - cart is empty."
    total_items = sum(i["quantity"] for i in cart)
    session.delete("cart")  # clear after checkout
    return f"Order placed! {total_items} items will be shipped."


def approve(name: str, arguments: dict[str, Any]) -> bool:
    """Here every checkout is approved; a real app asks the user."""
    print(f"  approve {name}({arguments})? yes")
    return True


TURNS = ["Add 2 widgets to cart", "Add 3 gadgets", "Checkout", "What's in my cart?"]


async def main() -> None:
    session = await create_session(
        "shopper-1",
        "sqlite:///sessions.db",
        tools=[add_to_cart, view_cart, clear_cart, checkout],
        approve=approve,
        system_prompt="You run a shop. Use the cart tools for everything about the cart.",
    )
    for number, text in enumerate(TURNS, 1):
        print(f"Turn {number}:")
        print(f"  Session Before: {session.state.to_dict()}")
        print(f"  User: {text!r}")
        result = await session.send_message(text)
        for step in result.steps:
            print(f"  Tool: {step.action}({step.action_input}) -> {step.observation!r}")
        print(f"  Session After: {session.state.to_dict()}")
        print(f"  Response: {result.result!r}")
    await session.close()


if __name__ == "__main__":
    asyncio.run(main())
