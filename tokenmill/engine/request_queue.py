"""The waiting queue, in the order of the scheduling policy.

fcfs:     arrival order; a preempted request goes back to the very front.
priority: (priority, arrival) order; a preempted request keeps its place by that key, which puts
          it ahead of everything of equal priority that arrived after it.
deadline_first (with latency promises on): earliest deadline first (within a priority class
          under the priority policy), best effort after every promise (Request.deadline_key).
"""

from __future__ import annotations

import heapq
from collections import deque

from tokenmill.engine.request import Request


class RequestQueue:
    def __init__(self, policy: str = "fcfs", deadline_first: bool = False) -> None:
        self.policy = policy
        self.deadline_first = deadline_first
        self._is_heap = policy == "priority" or deadline_first
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[tuple, Request]] = []

    def _key(self, request: Request) -> tuple:
        if self.deadline_first:
            return request.deadline_key(by_priority=self.policy == "priority")
        return request.sort_key

    def push(self, request: Request) -> None:
        if self._is_heap:
            heapq.heappush(self._heap, (self._key(request), request))
        else:
            self._fifo.append(request)

    def push_front(self, request: Request) -> None:
        if self._is_heap:
            self.push(request)
        else:
            self._fifo.appendleft(request)

    def peek(self) -> Request:
        return self._heap[0][1] if self._is_heap else self._fifo[0]

    def pop(self) -> Request:
        if self._is_heap:
            return heapq.heappop(self._heap)[1]
        return self._fifo.popleft()

    def remove(self, request: Request) -> None:
        if self._is_heap:
            self._heap = [item for item in self._heap if item[1] is not request]
            heapq.heapify(self._heap)
        else:
            self._fifo.remove(request)

    def __len__(self) -> int:
        return len(self._heap) if self._is_heap else len(self._fifo)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self):
        if self._is_heap:
            return iter([r for _, r in sorted(self._heap, key=lambda item: item[0])])
        return iter(self._fifo)
