"""The waiting queue, in the order of the scheduling policy.

fcfs:     arrival order; a preempted request goes back to the very front.
priority: (priority, arrival) order; a preempted request keeps its place by that key, which puts
          it ahead of everything of equal priority that arrived after it.
"""

from __future__ import annotations

import heapq
from collections import deque

from tokenmill.engine.request import Request


class RequestQueue:
    def __init__(self, policy: str = "fcfs") -> None:
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[tuple[int, float, int], Request]] = []

    def push(self, request: Request) -> None:
        if self.policy == "priority":
            heapq.heappush(self._heap, (request.sort_key, request))
        else:
            self._fifo.append(request)

    def push_front(self, request: Request) -> None:
        if self.policy == "priority":
            self.push(request)
        else:
            self._fifo.appendleft(request)

    def peek(self) -> Request:
        return self._heap[0][1] if self.policy == "priority" else self._fifo[0]

    def pop(self) -> Request:
        if self.policy == "priority":
            return heapq.heappop(self._heap)[1]
        return self._fifo.popleft()

    def remove(self, request: Request) -> None:
        if self.policy == "priority":
            self._heap = [item for item in self._heap if item[1] is not request]
            heapq.heapify(self._heap)
        else:
            self._fifo.remove(request)

    def __len__(self) -> int:
        return len(self._heap) if self.policy == "priority" else len(self._fifo)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self):
        if self.policy == "priority":
            return iter([r for _, r in sorted(self._heap, key=lambda item: item[0])])
        return iter(self._fifo)
