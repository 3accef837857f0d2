from django.db import models


class Order(models.Model):
    customer = models.CharField(max_length=100)
    paid = models.BooleanField(default=False)
    total = models.IntegerField(default=0)


class Line(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="lines")
    item = models.CharField(max_length=100)
    qty = models.IntegerField()
