from django.contrib.auth.models import User
from django.db import connection, transaction
from django.db.models import Sum
from django.test import TestCase, TransactionTestCase

from .models import Line, Order


class OrdersInATransaction(TestCase):
    """Each test runs inside a transaction the runner rolls back."""

    def test_create_and_read(self):
        o = Order.objects.create(customer="ann", total=30)
        Line.objects.create(order=o, item="tea", qty=3)
        self.assertEqual(Order.objects.get(pk=o.pk).customer, "ann")
        self.assertEqual(o.lines.aggregate(n=Sum("qty"))["n"], 3)

    def test_savepoints(self):
        o = Order.objects.create(customer="bob")
        try:
            with transaction.atomic():
                Order.objects.filter(pk=o.pk).update(paid=True)
                raise RuntimeError("roll back to the savepoint")
        except RuntimeError:
            pass
        self.assertFalse(Order.objects.get(pk=o.pk).paid)

    def test_auth_tables(self):
        User.objects.create_user("carol", password="x")
        self.assertTrue(User.objects.filter(username="carol").exists())


class OrdersCommitted(TransactionTestCase):
    """Autocommit writes and reads right after them; the runner truncates the tables."""

    def test_write_then_read(self):
        for i in range(20):
            o = Order.objects.create(customer=f"c{i}", total=i)
            self.assertEqual(Order.objects.get(pk=o.pk).total, i)
            Order.objects.filter(pk=o.pk).update(paid=True)
            self.assertTrue(Order.objects.get(pk=o.pk).paid)
        self.assertEqual(Order.objects.filter(paid=True).count(), 20)

    def test_atomic_blocks(self):
        with transaction.atomic():
            o = Order.objects.create(customer="dan")
            Line.objects.create(order=o, item="cake", qty=1)
        self.assertEqual(Line.objects.filter(order__customer="dan").count(), 1)
        with connection.cursor() as c:
            c.execute("SELECT current_database()")
            self.assertTrue(c.fetchone()[0].startswith("test_"))
