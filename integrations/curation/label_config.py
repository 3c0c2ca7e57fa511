"""The labeling configs Label Studio shows reviewers, and the control names the results are read by."""

# Control tag names: the review config's results carry them as `from_name`.
PROMPT = "prompt"
DECISION = "decision"
RATING = "rating"
ANSWER = "answer"
PAIRWISE = "pairwise"
ACCEPT = "accept"
REJECT = "reject"

# The prompt as the reviewer should read it (chat messages by role, a completion prompt as one "prompt"
# turn, a Responses request as its instructions and input turns), the model's answer for reference, and
# the three controls: accept/reject, a 1-5 rating and the answer text, which the prediction pre-fills
# with the model's answer so a correction is an edit.
REVIEW_CONFIG = f"""<View>
  <Header value="Prompt"/>
  <Paragraphs name="{PROMPT}" value="$messages" layout="dialogue" nameKey="role" textKey="content"/>
  <Header value="Model answer ($model)"/>
  <Text name="response" value="$response"/>
  <Header value="Is the answer acceptable?"/>
  <Choices name="{DECISION}" toName="{PROMPT}" choice="single-radio" showInline="true">
    <Choice value="{ACCEPT}"/>
    <Choice value="{REJECT}"/>
  </Choices>
  <Header value="Quality (1-5)"/>
  <Rating name="{RATING}" toName="{PROMPT}" maxRating="5"/>
  <Header value="Corrected answer (edit the model's answer; leave it unchanged to keep it)"/>
  <TextArea name="{ANSWER}" toName="{PROMPT}" editable="true" maxSubmissions="1" rows="6"/>
</View>"""

# Two answers to the same prompt; which batch is on the left is randomised per task (in task data).
PAIRWISE_CONFIG = f"""<View>
  <Header value="Prompt"/>
  <Paragraphs name="{PROMPT}" value="$messages" layout="dialogue" nameKey="role" textKey="content"/>
  <Header value="Which answer is better?"/>
  <Pairwise name="{PAIRWISE}" toName="answer_left,answer_right"/>
  <View style="display: flex; gap: 1em;">
    <View style="flex: 1;"><Text name="answer_left" value="$answer_left"/></View>
    <View style="flex: 1;"><Text name="answer_right" value="$answer_right"/></View>
  </View>
</View>"""
